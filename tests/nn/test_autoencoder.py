"""HierarchicalAutoEncoder: geometry at 32 and 64, decode with dropped levels, training signal, dq/vq parity."""

from __future__ import annotations

import pytest
import torch

from lightning_dq.nn.autoencoder import HierarchicalAutoEncoder, count_parameters
from lightning_dq.nn.heads import head_reconstruct

TINY = dict(
    channels=16, res_blocks=1, res_channels=8, code_dim=4, num_codebooks=2, codebook_sizes=[8, 8], num_mixtures=2
)


def images(b: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_readme_preset_geometry_and_parameter_count():
    torch.manual_seed(0)
    net = HierarchicalAutoEncoder()  # the defaults are the official README configuration
    assert count_parameters(net) == 44_598_564  # the paper's notes estimate ~44.6M; the paper claims 22M
    assert net.code_shapes(32) == [(2, 2, 5, 32), (4, 4, 5, 32), (8, 8, 5, 32)]
    assert net.code_shapes(64) == [(4, 4, 5, 32), (8, 8, 5, 32), (16, 16, 5, 32)]
    net.eval()
    with torch.no_grad():
        for side, grids in [(32, [2, 4, 8]), (64, [4, 8, 16])]:  # same weights at both sizes
            out = net(images(1, side))
            assert [tuple(c.shape) for c in out.codes] == [(1, 5, g, g) for g in grids]
            assert out.params.shape == (1, 100, side, side)
            assert out.recon.shape == (1,)


@pytest.mark.parametrize("head, channels", [("mix", 20), ("categorical", 768), ("mse", 3)])
def test_heads(head, channels):
    net = HierarchicalAutoEncoder(**TINY, head=head)
    out = net(images(2, 16))
    assert out.params.shape == (2, channels, 16, 16)
    assert out.recon.shape == (2,) and torch.isfinite(out.recon).all()


def test_decode_matches_forward_and_drops_levels():
    torch.manual_seed(0)
    net = HierarchicalAutoEncoder(**TINY)
    net(images(4, 16))  # initialise codebooks from data
    net.eval()
    x = images(2, 16, seed=1)
    out = net(x)
    codes = net.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(codes, out.codes, strict=True))
    torch.testing.assert_close(net.decode(codes), out.params)
    # keep only the top level: the bottom level's codes no longer matter, the top's do
    other = [codes[0], torch.randint(0, 8, codes[1].shape)]
    torch.testing.assert_close(net.decode(codes, keep_levels=[0]), net.decode(other, keep_levels=[0]))
    assert not torch.allclose(net.decode(codes, keep_levels=[0]), net.decode(codes))
    with pytest.raises(ValueError, match="keep_levels"):
        net.decode(codes, keep_levels=[2])


def test_one_step_lowers_loss_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = HierarchicalAutoEncoder(**TINY)
    x = images(8, 16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    out = net(x)
    loss = out.recon.mean() + 0.25 * out.commitment
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    opt.step()
    opt.zero_grad()
    after = net(x)
    assert (after.recon.mean() + 0.25 * after.commitment).item() < loss.item()


def test_dq_and_vq_have_same_codebook_memory_and_decoder_width():
    dq = HierarchicalAutoEncoder(**TINY, mode="dq")
    vq = HierarchicalAutoEncoder(**TINY, mode="vq")
    assert [b.shape for b in dq.buffers()] == [b.shape for b in vq.buffers()]
    assert [q.out_channels for q in dq.quantizers] == [q.out_channels for q in vq.quantizers] == [8, 8]
    # only the projections differ: C -> M*D (dq) vs C -> D (vq)
    assert [q.proj.out_channels for q in dq.quantizers] == [8, 8]
    assert [q.proj.out_channels for q in vq.quantizers] == [4, 4]
    assert count_parameters(dq.decoder) == count_parameters(vq.decoder)


def test_bad_inputs_and_arguments():
    net = HierarchicalAutoEncoder(**TINY)
    with pytest.raises(ValueError, match="uint8"):
        net(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="resolution=12"):
        net(images(1, 12))
    with pytest.raises(ValueError, match="codebook_sizes"):
        HierarchicalAutoEncoder(**(TINY | {"codebook_sizes": []}))
    with pytest.raises(ValueError, match="channels=1"):  # the encoders' first conv would have no channels
        HierarchicalAutoEncoder(**(TINY | {"channels": 1}))
    # stride, mode, head and init are Literal types: the CLI refuses other values before any constructor runs


def test_encode_decode_round_trip_matches_the_forward_pass_and_never_changes_a_codebook():
    torch.manual_seed(0)
    net = HierarchicalAutoEncoder(**TINY)
    x = images(4, 16)
    net.train()(x)  # the data-dependent init
    before = {k: v.clone() for k, v in net.state_dict().items()}
    codes = net.encode(x)  # in training mode: the quantizers must not update
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [tuple(c.shape) for c in codes] == [(4, 2, 2, 2), (4, 2, 4, 4)] and all(
        c.dtype == torch.int64 for c in codes
    )
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert all(torch.equal(a, b) for a, b in zip(codes, out.codes, strict=True))  # the forward pass's codes
    assert torch.equal(net.decode(codes), out.params)  # the forward pass's head parameters
    recon = net.reconstruct(codes)
    assert recon.dtype == torch.uint8 and torch.equal(recon, head_reconstruct("mix", out.params, 2))


def _code_sensitivity(net: HierarchicalAutoEncoder) -> float:
    """How much the head parameters move when the codes change, relative to their own spread."""
    net.eval()
    with torch.no_grad():
        shapes = net.code_shapes(32)  # (h, w, M, K) per level, top first
        codes = [torch.randint(0, k, (4, m, h, w)) for h, w, m, k in shapes]
        other = [torch.roll(c, 1, dims=0) for c in codes]  # another image's codes
        p, q = net.decode(codes), net.decode(other)
    return ((p - q).std() / p.std()).item()


def test_kaiming_init_makes_the_decoder_see_the_codes():
    kwargs = dict(channels=64, res_blocks=2, res_channels=32, code_dim=16)  # the demo net
    nets = {}
    for init in ("default", "kaiming"):
        torch.manual_seed(0)
        nets[init] = HierarchicalAutoEncoder(**kwargs, init=init)
        nets[init].train()(images(8, 32))  # one training pass: k-means++ init of the codebooks from data
    sensitivity = {init: _code_sensitivity(net) for init, net in nets.items()}
    # PyTorch's default init (the paper's code): the deep decoder is almost blind to its input (3e-4 vs 0.66)
    assert sensitivity["default"] < 0.01, sensitivity
    assert sensitivity["kaiming"] > 0.3, sensitivity
    kaiming = nets["kaiming"]
    for module in kaiming.modules():  # residual branches start as the identity
        if module.__class__.__name__ == "ResBlock":
            assert module.net[-1].weight.abs().sum() == 0
