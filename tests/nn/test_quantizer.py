"""DepthwiseQuantizer / Codebook: shapes, exact EMA arithmetic, batched == reference, convergence, non-finite
dead-code restart, fp32 under autocast, 2-process gloo DDP, state_dict round trip, argument errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_dq.nn.codebook import Codebook, laplace_smoothing, perplexity
from lightning_dq.nn.quantizer import DepthwiseQuantizer


def identity_quantizer(m: int, k: int, d: int, **kwargs) -> DepthwiseQuantizer:
    """A dq quantizer whose projection is the identity, so tests control the vectors exactly."""
    q = DepthwiseQuantizer(m * d, m, k, d, mode="dq", **kwargs)
    with torch.no_grad():
        q.proj.weight.copy_(torch.eye(m * d).view(m * d, m * d, 1, 1))
        q.proj.bias.zero_()
    return q


def set_codebook(cb: Codebook, embed: torch.Tensor, count: float = 1.0) -> None:
    """Put the codebook in a known, initialised state."""
    with torch.no_grad():
        cb.embed.copy_(embed)
        cb.cluster_size.fill_(count)
        cb.embed_avg.copy_(embed * count)
        cb.initialized.fill_(True)


@pytest.mark.parametrize("mode", ["dq", "vq"])
def test_shapes_dtypes_and_gradient(mode):
    q = DepthwiseQuantizer(12, num_codebooks=3, codebook_size=8, code_dim=4, mode=mode)
    x = torch.randn(2, 12, 5, 7, requires_grad=True)
    out = q(x)
    assert out.quantized.shape == (2, 12, 5, 7) and out.quantized.dtype == torch.float32
    assert out.codes.shape == (2, 3, 5, 7) and out.codes.dtype == torch.int64
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 8
    assert out.commitment.shape == () and out.commitment > 0
    assert out.stats.perplexity.shape == (3,) and out.stats.dead_fraction.shape == (3,)
    (out.quantized.square().sum() + out.commitment).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert q.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["dq", "vq"])
def test_embed_codes_round_trip_in_eval(mode):
    q = DepthwiseQuantizer(6, 2, 16, 3, mode=mode)
    q(torch.randn(4, 6, 4, 4))  # one training pass: data init + EMA
    q.eval()
    out = q(torch.randn(3, 6, 4, 4))
    assert torch.equal(q.embed_codes(out.codes), out.quantized)


def test_vq_mode_shares_the_vector_and_matches_dq_memory():
    dq = DepthwiseQuantizer(10, 4, 16, 5, mode="dq")
    vq = DepthwiseQuantizer(10, 4, 16, 5, mode="vq")
    assert dq.out_channels == vq.out_channels == 20
    assert [b.shape for b in dq.buffers()] == [b.shape for b in vq.buffers()]
    assert vq.proj.out_channels == 5 and dq.proj.out_channels == 20
    # all codebooks identical -> every codebook picks the same code for the shared vector
    vq.eval()
    set_codebook(vq.codebook, torch.randn(1, 16, 5).expand(4, 16, 5).clone())
    codes = vq(torch.randn(2, 10, 3, 3)).codes  # (B, M, h, w)
    assert (codes == codes[:, :1]).all()


def test_ema_arithmetic_by_hand():
    # M=1, K=2, D=1; codes at 0 and 10, counts 1; batch {1, 2, 9}; decay 0.5
    q = identity_quantizer(1, 2, 1, decay=0.5, eps=1e-5, dead_code_threshold=0.0)
    set_codebook(q.codebook, torch.tensor([[[0.0], [10.0]]]))
    x = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)
    out = q(x)
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # quantized uses the codebook the codes were chosen from (before the update)
    assert out.quantized.flatten().tolist() == [0.0, 0.0, 10.0]
    # commitment: mean of (1-0)^2, (2-0)^2, (9-10)^2 = 2, one codebook
    assert out.commitment.item() == pytest.approx(2.0)
    cb = q.codebook
    size = [0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1]  # [1.5, 1.0]
    avg = [0.5 * 0 + 0.5 * 3, 0.5 * 10 + 0.5 * 9]  # [1.5, 9.5]
    n, eps = sum(size), 1e-5
    smoothed = [(s + eps) / (n + 2 * eps) * n for s in size]
    assert cb.cluster_size.flatten().tolist() == pytest.approx(size, abs=1e-6)
    assert cb.embed_avg.flatten().tolist() == pytest.approx(avg, abs=1e-6)
    assert cb.embed.flatten().tolist() == pytest.approx([avg[0] / smoothed[0], avg[1] / smoothed[1]], abs=1e-6)
    assert out.stats.perplexity.item() == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))


def test_laplace_smoothing_keeps_total_and_avoids_zero():
    counts = torch.tensor([[0.0, 3.0, 1.0]])
    s = laplace_smoothing(counts, 1e-5)
    assert s.sum().item() == pytest.approx(4.0)
    assert (s > 0).all()
    assert perplexity(torch.tensor([[5.0, 5.0, 5.0, 5.0]])).item() == pytest.approx(4.0)


def reference_step(embed, size, avg, x, decay, eps):
    """Straightforward per-codebook reference: explicit distances, one-hot statistics, Python loop."""
    codes, embed, size, avg = [], embed.clone(), size.clone(), avg.clone()
    for m in range(x.shape[0]):
        dist2 = ((x[m, :, None, :] - embed[m][None]) ** 2).sum(-1)  # (N, K)
        c = dist2.argmin(-1)
        onehot = torch.nn.functional.one_hot(c, embed.shape[1]).float()  # (N, K)
        size[m] = decay * size[m] + (1 - decay) * onehot.sum(0)
        avg[m] = decay * avg[m] + (1 - decay) * onehot.T @ x[m]
        n = size[m].sum()
        embed[m] = avg[m] / ((size[m] + eps) / (n + embed.shape[1] * eps) * n)[:, None]
        codes.append(c)
    return torch.stack(codes), embed, size, avg


def test_batched_equals_per_codebook_reference():
    torch.manual_seed(0)
    m, k, d = 3, 7, 4
    q = identity_quantizer(m, k, d, decay=0.9, dead_code_threshold=0.0)
    init = torch.randn(m, k, d)
    set_codebook(q.codebook, init)
    embed, size, avg = init.clone(), torch.ones(m, k), init.clone()
    for _ in range(5):
        x = torch.randn(2, m * d, 3, 5)
        vectors = x.view(2, m, d, 3, 5).permute(1, 0, 3, 4, 2).reshape(m, -1, d)  # (M, N, D)
        codes_ref, embed, size, avg = reference_step(embed, size, avg, vectors, 0.9, 1e-5)
        codes = q(x).codes.permute(1, 0, 2, 3).reshape(m, -1)
        assert torch.equal(codes, codes_ref)
        torch.testing.assert_close(q.codebook.cluster_size, size)
        torch.testing.assert_close(q.codebook.embed_avg, avg)
        torch.testing.assert_close(q.codebook.embed, embed)


def test_converges_to_cluster_centres():
    torch.manual_seed(0)
    m, k, d, noise = 2, 4, 2, 0.05
    corners = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]])
    centres = corners + 0.5 * torch.randn(m, k, d)  # (M, K, D): well separated clusters per slice
    q = identity_quantizer(m, k, d, decay=0.9)
    for _ in range(150):
        pick = torch.randint(k, (m, 256))
        vectors = torch.gather(centres, 1, pick[..., None].expand(-1, -1, d)) + noise * torch.randn(m, 256, d)
        x = vectors.permute(1, 0, 2).reshape(256, m * d, 1, 1)  # (B, M*D, 1, 1)
        out = q(x)
    assert (out.stats.perplexity > 0.95 * k).all()
    # mean squared distance per codebook ~ D * noise^2
    assert out.commitment.item() / m < 2 * d * noise**2
    # every centre has a code within a few noise std
    gap = torch.cdist(centres, q.codebook.embed).min(-1).values  # (M, K)
    assert gap.max() < 5 * noise


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = identity_quantizer(1, 4, 2, decay=0.99, dead_code_threshold=1.0)
    embed = torch.tensor([[[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [1000.0, 1000.0]]])
    set_codebook(q.codebook, embed)
    data = lambda: (torch.randn(64, 2) * 0.2 + torch.tensor([[-1.0, 1.0]])).view(64, 2, 1, 1)  # noqa: E731
    # data sit at (-1, 1): codes 0 and 1 share it; codes 2 and 3 get nothing, decay to 0.99 < 1: restarted
    out = q(data())
    assert out.stats.restarted.tolist() == [2.0]
    assert out.stats.dead_fraction.tolist() == [0.5]  # measured before the restart revived them
    cb = q.codebook
    assert cb.embed[0, 3].abs().max() < 10  # now a batch vector
    assert cb.cluster_size[0, 3].item() == pytest.approx(1.0)
    torch.testing.assert_close(cb.embed_avg[0, 3], cb.embed[0, 3] * 1.0)
    for _ in range(20):
        out = q(data())
    counts = torch.bincount(out.codes.flatten(), minlength=4)
    assert counts.sum() == 64 and (counts > 0).sum() >= 2  # revived codes win assignments


def test_restart_can_be_disabled():
    q = identity_quantizer(1, 4, 2)
    set_codebook(q.codebook, torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [1e3, 1e3]]]))
    q.codebook.restart_enabled = False
    q(torch.zeros(8, 2, 1, 1))
    assert q.codebook.embed[0, 3, 0].item() == pytest.approx(1e3, rel=1e-3)


def test_data_dependent_init_uses_batch_vectors():
    torch.manual_seed(0)
    q = identity_quantizer(2, 8, 3)
    x = torch.randn(4, 6, 4, 4) + 50.0  # far from the N(0, 1) construction-time codebook
    q(x)
    assert bool(q.codebook.initialized)
    vectors = x.view(4, 2, 3, 4, 4).permute(1, 0, 3, 4, 2).reshape(2, -1, 3)
    # each code is one of the batch vectors or an EMA mean of them: all near 50
    assert (q.codebook.embed - 50).abs().max() < 5
    assert vectors.shape == (2, 64, 3)


def test_fp32_maths_under_bf16_autocast():
    torch.manual_seed(0)
    q = DepthwiseQuantizer(8, 2, 16, 4)
    q(torch.randn(4, 8, 4, 4))
    q.eval()
    x = torch.randn(4, 8, 4, 4)
    plain = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q(x.bfloat16())
    assert auto.quantized.dtype == torch.float32 and auto.commitment.dtype == torch.float32
    assert all(b.dtype in (torch.float32, torch.bool) for b in q.buffers())
    # the bf16 input is rounded, but the maths is fp32: codes agree almost everywhere
    assert (auto.codes == plain.codes).float().mean() > 0.95
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = q(x)
    assert torch.equal(again.codes, plain.codes) and torch.equal(again.quantized, plain.quantized)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    q = DepthwiseQuantizer(8, 2, 16, 4)
    for _ in range(3):
        q(torch.randn(4, 8, 4, 4))
    q2 = DepthwiseQuantizer(8, 2, 16, 4)
    q2.load_state_dict(q.state_dict())
    assert bool(q2.codebook.initialized)
    q.eval(), q2.eval()
    x = torch.randn(2, 8, 4, 4)
    a, b = q(x), q2(x)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("kwargs", [dict(decay=1.0), dict(decay=-0.1), dict(eps=0.0), dict(dead_code_threshold=-1.0)])
def test_bad_ranges_name_the_argument(kwargs):
    # types and Literal values (mode, commitment_reduction) are the CLI's to check; ranges are the constructor's
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}={next(iter(kwargs.values()))}"):
        DepthwiseQuantizer(8, 2, 4, 4, **kwargs)


def test_bad_inputs():
    q = DepthwiseQuantizer(8, 2, 4, 4)
    with pytest.raises(ValueError, match=r"expected features \(B, 8, h, w\)"):
        q(torch.randn(1, 7, 2, 2))
    with pytest.raises(ValueError, match="codes must have shape"):
        q.embed_codes(torch.zeros(1, 3, 2, 2, dtype=torch.long))


def test_dead_fraction_without_restarts_counts_far_codes():
    q = identity_quantizer(2, 4, 1, decay=0.5, dead_code_threshold=1.0)
    q.codebook.restart_enabled = False
    set_codebook(q.codebook, torch.tensor([[0.0, 1.0, 50.0, 60.0], [0.0, 70.0, 80.0, 90.0]]).view(2, 4, 1))
    x = torch.tensor([0.1, 0.9, 0.0, 1.1]).view(4, 1, 1, 1).repeat(1, 2, 1, 1)  # all near 0 and 1
    out = q(x)
    # codebook 0: codes 0, 1 win 2 vectors each (count 0.5 + 1 = 1.5), codes 2, 3 decay to 0.5: 2 of 4 dead
    # codebook 1: code 0 wins all 4 (count 2.5), codes 1-3 decay to 0.5: 3 of 4 dead
    assert out.stats.dead_fraction.tolist() == [0.5, 0.75]
    assert out.stats.restarted.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_leaves_the_codebook_unchanged(bad):
    torch.manual_seed(0)
    q = DepthwiseQuantizer(8, 2, 4, 4)
    q(torch.randn(4, 8, 2, 2))  # init + one EMA step
    before = {n: b.clone() for n, b in q.codebook.named_buffers()}
    x = torch.randn(4, 8, 2, 2)
    x[1, 3, 0, 1] = bad
    out = q(x)  # no exception: the step is skipped by lightning_dq.training.callbacks.NonFiniteGuard
    for name, buf in q.codebook.named_buffers():
        assert torch.equal(buf, before[name]), name
    assert out.stats.restarted.tolist() == [0.0, 0.0]
    assert not torch.isfinite(out.commitment)  # the loss shows it, so the optimizer step is skipped


def test_init_waits_for_a_finite_batch_and_follows_loaded_state():
    q = identity_quantizer(1, 4, 4)
    embed = q.codebook.embed.clone()
    q(torch.full((2, 4, 2, 2), float("nan")))
    assert not bool(q.codebook.initialized) and q.codebook.needs_init()
    assert torch.equal(q.codebook.embed, embed)
    q(torch.randn(2, 4, 2, 2) + 30.0)
    assert bool(q.codebook.initialized) and not q.codebook.needs_init()
    assert (q.codebook.embed - 30.0).abs().max() < 6
    q.load_state_dict(DepthwiseQuantizer(4, 1, 4, 4).state_dict())  # an uninitialised state
    assert q.codebook.needs_init()


# ---------------------------------------------------------------------------------------------------
# 2-process DDP on CPU (gloo)
# ---------------------------------------------------------------------------------------------------

M, K, D, STEPS = 2, 8, 3, 6


def _batches(step: int) -> torch.Tensor:
    """The global batch of a step: 2 * 16 vectors; rank r gets rows [16r, 16r+16)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, M * D, 1, 1, generator=g) * (1 + step % 3)


def _initial_embed() -> torch.Tensor:
    return torch.randn(M, K, D, generator=torch.Generator().manual_seed(7))


def _ddp_worker(rank: int, port: int, out_dir: str, restarts: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(1000 + rank)  # different RNG per rank: restarts must still agree
    q = identity_quantizer(M, K, D, decay=0.8, dead_code_threshold=1.0 if restarts else 0.0)
    if not restarts:
        set_codebook(q.codebook, _initial_embed())
    for step in range(STEPS):
        q(_batches(step)[16 * rank : 16 * (rank + 1)])
    torch.save({n: b.clone() for n, b in q.codebook.named_buffers()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("restarts", [False, True])
@pytest.mark.xdist_group("sockets")  # ports: see tests/test_ddp.py
def test_ddp_two_processes_identical_codebooks(tmp_path, restarts, free_port):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path), restarts), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"buffer {name} differs between ranks"
    if restarts:
        return
    # equal to one process that sees the concatenated batch
    q = identity_quantizer(M, K, D, decay=0.8, dead_code_threshold=0.0)
    set_codebook(q.codebook, _initial_embed())
    for step in range(STEPS):
        q(_batches(step))
    for name, buf in q.codebook.named_buffers():
        torch.testing.assert_close(r0[name], buf, msg=f"buffer {name}: DDP != single process")


NAN_STEPS = {0: 1, 3: 1, 4: 0}  # step -> the one rank whose batch holds a NaN at that step


def _nan_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(1000 + rank)
    exact = identity_quantizer(M, K, D, decay=0.8, dead_code_threshold=0.0)  # reference-comparable
    set_codebook(exact.codebook, _initial_embed())
    live = identity_quantizer(M, K, D, decay=0.8, dead_code_threshold=1.0)  # data init + restarts
    initialized = []
    for step in range(STEPS):
        x = _batches(step)[16 * rank : 16 * (rank + 1)].clone()
        if NAN_STEPS.get(step) == rank:
            x[5, 1] = float("nan")
        exact(x), live(x)
        initialized.append(bool(live.codebook.initialized))
    state = {
        f"{name}.{n}": b.clone()
        for name, q in [("exact", exact), ("live", live)]
        for n, b in q.codebook.named_buffers()
    }
    torch.save({"state": state, "initialized": initialized}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.xdist_group("sockets")
def test_ddp_nan_on_one_rank_poisons_no_codebook(tmp_path, free_port):
    mp.spawn(_nan_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)  # returns: nobody hangs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in r0["state"]:
        assert torch.equal(r0["state"][name], r1["state"][name]), f"buffer {name} differs between ranks"
        assert torch.isfinite(r0["state"][name].float()).all(), name
    # the data init waited for the first step where both ranks' batches were finite
    assert r0["initialized"] == r1["initialized"] == [False] + [True] * (STEPS - 1)
    # the steps where one rank saw NaN changed nothing: equal to one process fed only the other steps
    q = identity_quantizer(M, K, D, decay=0.8, dead_code_threshold=0.0)
    set_codebook(q.codebook, _initial_embed())
    for step in range(STEPS):
        if step not in NAN_STEPS:
            q(_batches(step))
    for name, buf in q.codebook.named_buffers():
        torch.testing.assert_close(r0["state"][f"exact.{name}"], buf, msg=f"buffer {name}: DDP != reference")
