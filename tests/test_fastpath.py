"""The fast path: bf16 autocast + channels_last gives the fp32 loss within 1%; where the device only
emulates bf16 the auto-encoder runs in fp32 inside a bf16 autocast region (bit-identical to fp32)."""

from __future__ import annotations

import warnings

import torch

from lightning_dq.autoencoder import HierarchicalAutoEncoder, bf16_is_native
from lightning_dq.formats import synthetic_images
from lightning_dq.module import AutoEncoderModule

TINY = dict(channels=16, res_blocks=1, res_channels=8, code_dim=4, num_codebooks=2, codebook_sizes=[8, 8],
            num_mixtures=2)  # fmt: skip
NATIVE = bf16_is_native("cpu")


def batch(n: int = 8, side: int = 16) -> torch.Tensor:
    return torch.from_numpy(synthetic_images(n, side, seed=3))  # (n, 3, side, side) uint8


def trained_pair(**kwargs) -> tuple[HierarchicalAutoEncoder, HierarchicalAutoEncoder]:
    """Two nets with the same weights and codebooks (initialised from data by one fp32 training pass)."""
    torch.manual_seed(0)
    ref = HierarchicalAutoEncoder(**TINY, init="kaiming")
    ref(batch())  # training mode: data-dependent codebook init + one EMA step
    other = HierarchicalAutoEncoder(**TINY, init="kaiming", **kwargs)
    other.load_state_dict(ref.state_dict())
    return ref.eval(), other.eval()


def loss(out, beta: float = 0.25) -> torch.Tensor:
    return out.recon.mean() + beta * out.commitment  # () as AutoEncoderModule's training loss


@torch.no_grad()
def test_bf16_channels_last_loss_within_one_percent_of_fp32():
    ref, fast = trained_pair(emulated_bf16=True)  # bf16 on every CPU, native or not
    fast.to(memory_format=torch.channels_last)
    x = batch()
    expected = loss(ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert out.params.dtype == torch.bfloat16  # the convolutions really ran in bf16
    assert out.recon.dtype == torch.float32  # the likelihood did not
    got = loss(out)
    assert abs(got - expected) <= 0.01 * abs(expected), (got.item(), expected.item())
    assert not torch.equal(got, expected)  # bf16 changed the numbers: this compares two paths


@torch.no_grad()
def test_autocast_on_emulated_bf16_runs_fp32_and_says_so():
    ref, net = trained_pair()  # emulated_bf16=False: the default
    x = batch()
    expected = ref(x)
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        out = net(x)
    if NATIVE:
        assert out.params.dtype == torch.bfloat16 and not caught
    else:
        assert out.params.dtype == torch.float32
        assert torch.equal(out.params, expected.params) and torch.equal(out.recon, expected.recon)
        assert all(torch.equal(a, b) for a, b in zip(out.codes, expected.codes, strict=True))
        assert any("without native bf16" in str(w.message) for w in caught)


@torch.no_grad()
def test_decode_and_encode_follow_the_same_precision_rule():
    ref, net = trained_pair()
    x = batch(4)
    codes = ref.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = net.decode(codes)
        codes_autocast = net.encode(x)
    assert params.dtype == (torch.bfloat16 if NATIVE else torch.float32)
    if not NATIVE:
        assert torch.equal(params, ref.decode(codes))
        assert all(torch.equal(a, b) for a, b in zip(codes_autocast, codes, strict=True))


def test_module_training_step_under_autocast_matches_fp32_within_one_percent():
    """AutoEncoderModule's default (channels_last) under bf16 autocast, as `precision: bf16-mixed` runs it:
    one training loss within 1% of the fp32 contiguous loss, gradients finite."""
    ref, fast_net = trained_pair(emulated_bf16=True)
    ref_module = AutoEncoderModule(ref.train(), channels_last=False)
    fast_module = AutoEncoderModule(fast_net.train())  # channels_last=True by default
    x = batch()
    expected = loss(ref_module(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast_module(x)
    got = loss(out)
    got.backward()
    assert abs(got.item() - expected.item()) <= 0.01 * abs(expected.item())
    grads = [p.grad for p in fast_module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_is_native_matches_the_cpu():
    """An AVX2-only CPU (no AVX-512, hence no AVX512-BF16 or AMX) emulates bf16; a non-CPU, non-CUDA device
    type is left to autocast as it is."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        assert bf16_is_native("cpu") is False
    else:
        assert bf16_is_native("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert bf16_is_native("meta") is True
