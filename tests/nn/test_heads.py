"""likelihood.py: normalisation of the logistic mixture, uniform and peaked cases (edges included),
sampling (peak, histogram), brute-force references, units, fp32 under bf16 autocast, argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dq.nn.figures import bits_per_dim, uniform_code_bits
from lightning_dq.nn.heads import dmol_nll, head_nll, head_reconstruct, head_sample

A = math.exp(7) / 255  # half a bin in units of the sharpest allowed logistic scale (log-scale clamp -7)
PIN = -1000.0  # a mean this far below -1 puts all of a channel's mass on value 0 (the left-tail edge bin)


Values = torch.Tensor | list[float]


def dmol_params(logits: Values, means: Values, log_scales: Values, coeffs: Values) -> torch.Tensor:
    """One pixel's parameters (1, 10n, 1, 1) from logits (n,) and means, log-scales, coeffs (3, n)."""
    parts = [torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in (logits, means, log_scales, coeffs)]
    return torch.cat(parts).view(1, -1, 1, 1)


def random_dmol(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random logits (n,) and means, log-scales (some below the clamp), coeffs (3, n)."""
    g = torch.Generator().manual_seed(seed)
    return (
        2 * torch.randn(n, generator=g),
        1.5 * torch.randn(3, n, generator=g),
        9 * torch.rand(3, n, generator=g) - 8,
        2 * torch.randn(3, n, generator=g),
    )


def pixel_probs(params: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Probabilities (N,) float64 of the pixels values (N, 3) under one pixel's parameters, via the NLL."""
    x = values.to(torch.uint8).view(-1, 3, 1, 1)
    return torch.exp(-3 * dmol_nll(params.expand(len(x), -1, -1, -1), x).double())  # 3 dims per pixel


def grid(*axes: torch.Tensor) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


ALL = torch.arange(256)
ZERO = torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize("pinned", [0, 1, 2])
def test_dmol_pair_of_channels_sums_to_one(n, pinned):
    # The third channel is pinned to value 0, so the sum over the other two covers R, G | R and B | R, G
    # with the autoregressive coupling at every value of the conditioning channel (except a pinned R).
    logits, means, log_scales, coeffs = random_dmol(n, seed=n + 10 * pinned)
    means[pinned] = PIN
    axes = [ZERO if c == pinned else ALL for c in range(3)]
    total = pixel_probs(dmol_params(logits, means, log_scales, coeffs), grid(*axes)).sum().item()
    assert abs(total - 1) < 1e-5


@pytest.mark.slow
def test_dmol_all_256_cubed_pixel_values_sum_to_one():
    params = dmol_params(*random_dmol(2, seed=7))
    total = sum(pixel_probs(params, grid(torch.tensor([r]), ALL, ALL)).sum().item() for r in range(256))
    assert abs(total - 1) < 1e-5


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_dmol_uniform_channel_gives_8_bits(channel):
    # A whole pixel cannot be uniform: the mixture is over pixels, so independent uniform channels need
    # 256^3 components; one very wide logistic is far from uniform too (see the next test). A single
    # channel can be: 256 equal components, each as sharp as the clamp allows, centred on the 256 bins,
    # the other channels pinned to 0. Bin k then gets (1 +- 2.5e-6) / 256: the leak of component k to its
    # neighbours is given back by theirs, up to sigmoid(-3A) = 2.5e-6.
    means = torch.full((3, 256), PIN)
    means[channel] = ALL / 127.5 - 1
    params = dmol_params(torch.zeros(256), means, torch.full((3, 256), -7.0), torch.zeros(3, 256))
    values = torch.zeros(256, 3, dtype=torch.long)
    values[:, channel] = ALL
    bits = -torch.log2(pixel_probs(params, values))  # (256,) bits of the whole pixel
    assert (bits - 8).abs().max().item() < 1e-4


def test_dmol_very_wide_logistic_puts_half_on_each_edge():
    params = dmol_params([0.0], torch.zeros(3), torch.full((3,), 12.0), torch.zeros(3))  # scale e^12
    x = torch.tensor([0, 255, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert bits_per_dim(dmol_nll(params, x)).item() == pytest.approx(1.0, abs=1e-4)  # not 8


def test_categorical_zero_logits_give_exactly_8_bits():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    bpd = bits_per_dim(head_nll("categorical", torch.zeros(2, 768, 4, 5), x))
    torch.testing.assert_close(bpd, torch.full((2,), 8.0), rtol=0, atol=1e-6)


def peaked_at(x: torch.Tensor, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Mixture params (B, 10n, H, W) whose component 0 dominates and sits on the bin centres of x,
    with random nonzero coupling coefficients compensated in the means."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    centres = x.double() / 127.5 - 1
    raw = torch.randn(b, 3, n, h, w, generator=g, dtype=torch.float64)  # coefficients, pre-tanh
    c = torch.tanh(raw[:, :, 0])
    mean0 = torch.stack(
        [
            centres[:, 0],
            centres[:, 1] - c[:, 0] * centres[:, 0],
            centres[:, 2] - c[:, 1] * centres[:, 0] - c[:, 2] * centres[:, 1],
        ],
        1,
    )
    means = torch.randn(b, 3, n, h, w, generator=g, dtype=torch.float64)
    means[:, :, 0] = mean0
    logits = torch.zeros(b, n, h, w, dtype=torch.float64)
    logits[:, 0] = 30.0
    log_scales = torch.full((b, 3, n, h, w), -20.0, dtype=torch.float64)  # clamped to -7 inside
    flat = [t.reshape(b, -1, h, w) for t in (logits, means, log_scales, raw)]
    return torch.cat(flat, 1).float()


def edge_rich_images() -> torch.Tensor:
    x = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x[0], x[1, :, :2] = 0, 255
    return x


def test_dmol_peaked_nll_is_the_clamp_floor_including_edges():
    # The log-scale clamp caps an interior bin's mass at 1 - 2 sigmoid(-A) (NLL 0.027 nats) and an edge
    # bin's at sigmoid(A) (0.013 nats): "near 0" means exactly these floors.
    x = edge_rich_images()
    floor_interior, floor_edge = -math.log1p(-2 / (1 + math.exp(A))), math.log1p(math.exp(-A))
    is_edge = (x == 0) | (x == 255)
    expected = torch.where(is_edge, floor_edge, floor_interior).double().mean(dim=(1, 2, 3))
    nll = head_nll("mix", peaked_at(x), x, num_mixtures=3)
    torch.testing.assert_close(nll.double(), expected, rtol=0, atol=1e-5)
    assert nll.max() < 0.03


def test_dmol_peaked_sample_and_reconstruction_return_the_peak():
    x = edge_rich_images()
    params = peaked_at(x)
    assert torch.equal(head_reconstruct("mix", params, 3), x)
    # At temperature 1 a clamped peak still leaks 2.7% to each neighbour pair; 0.1 makes the leak ~1e-19.
    torch.manual_seed(0)
    sample = head_sample("mix", params, 3, temperature=0.1)
    assert sample.dtype == torch.uint8 and sample.shape == x.shape and torch.equal(sample, x)
    far = torch.cat(
        [torch.zeros(1, 1, 2, 2), torch.full((1, 3, 2, 2), 1000.0), torch.full((1, 6, 2, 2), -7.0)], 1
    )  # means far above +1: always 255, never wrapped
    assert (head_sample("mix", far, 1) == 255).all()


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5, everything else pooled in one cell."""
    expected = n * probs
    keep = expected >= 5
    obs = torch.cat([counts[keep], (n - counts[keep].sum()).view(1)])
    exp = torch.cat([expected[keep], (n - expected[keep].sum()).view(1)])
    return ((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1


def test_dmol_sample_histogram_matches_model():
    torch.manual_seed(0)
    n_samples = 20000
    coeffs = torch.tensor([[1.5, -1.0], [0.5, 1.0], [-1.0, 0.8]])  # strong R -> G, R -> B, G -> B coupling
    parts = (
        torch.tensor([0.3, -0.2]),
        torch.tensor([[-0.3, 0.2], [0.1, -0.1], [0.0, 0.3]]),
        torch.full((3, 2), -4.0),
        coeffs,
    )
    params = dmol_params(*parts)
    sample = head_sample("mix", params.expand(1, -1, 100, 200), 2).view(3, -1).T.long()  # (N, 3)
    cells = grid(*(torch.arange(int(s.min()) - 3, int(s.max()) + 4).clamp(0, 255).unique() for s in sample.T))
    probs = pixel_probs(params, cells)
    assert probs.sum() > 0.999  # the box holds the model's mass
    code = lambda v: (v[:, 0] * 256 + v[:, 1]) * 256 + v[:, 2]  # noqa: E731  ascending over `cells`
    counts = torch.bincount(torch.searchsorted(code(cells), code(sample)), minlength=len(cells))
    stat, df = chi_square(counts.double(), probs, n_samples)
    assert stat < df + 5 * math.sqrt(2 * df)  # ~5 standard deviations of a chi-square with df degrees
    uncoupled = pixel_probs(dmol_params(*parts[:3], torch.zeros(3, 2)), cells)  # the test has power:
    stat, df = chi_square(counts.double(), uncoupled, n_samples)  # it rejects the model without coupling
    assert stat > df + 5 * math.sqrt(2 * df)


def test_categorical_sample_histogram_matches_softmax_with_temperature():
    torch.manual_seed(0)
    logits = 3 * torch.randn(1, 768, 1, 1)
    sample = head_sample("categorical", logits.expand(1, -1, 50, 100), temperature=0.5)  # (1, 3, 50, 100)
    probs = torch.softmax(logits.view(3, 256).double() / 0.5, dim=1)
    for c in range(3):
        stat, df = chi_square(torch.bincount(sample[0, c].flatten().long(), minlength=256).double(), probs[c], 5000)
        assert stat < df + 5 * math.sqrt(2 * df)
    assert torch.equal(head_reconstruct("categorical", logits), logits.view(1, 3, 256, 1, 1).argmax(2).byte())


def brute_force_dmol_nll(p: torch.Tensor, x: torch.Tensor) -> float:
    """Scalar loops over p (10n, W) and x (3, W): sum over components of weight x prod of CDF differences."""
    n = p.shape[0] // 10
    sig = lambda t: 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))  # noqa: E731
    total = 0.0
    for j in range(p.shape[1]):
        v = [int(x[c, j]) for c in range(3)]
        ctr = [k / 127.5 - 1 for k in v]
        lse = math.log(sum(math.exp(p[i, j]) for i in range(n)))
        pix = 0.0
        for k in range(n):
            q = [float(p[i * n + k, j]) for i in range(10)]  # logit, 3 means, 3 log-scales, 3 coeffs
            co = [math.tanh(t) for t in q[7:]]
            mu = [q[1], q[2] + co[0] * ctr[0], q[3] + co[1] * ctr[0] + co[2] * ctr[1]]
            w = math.exp(q[0] - lse)
            for c in range(3):
                s = math.exp(max(q[4 + c], -7))
                hi = 1.0 if v[c] == 255 else sig((ctr[c] + 1 / 255 - mu[c]) / s)
                lo = 0.0 if v[c] == 0 else sig((ctr[c] - 1 / 255 - mu[c]) / s)
                w *= hi - lo
            pix += w
        total -= math.log(pix)
    return total / (3 * p.shape[1])


def test_dmol_and_categorical_match_brute_force():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 1, 2), dtype=torch.uint8)
    x[0, 0, 0, 0], x[1, 2, 0, 1] = 0, 255
    logits = torch.randn(2, 768, 1, 2)

    def nll(b: int, c: int, j: int) -> float:  # -log softmax, logit of value k at channel c * 256 + k
        row = logits[b, c * 256 : (c + 1) * 256, 0, j].tolist()
        return math.log(sum(math.exp(t) for t in row)) - row[int(x[b, c, 0, j])]

    want = [sum(nll(b, c, j) for c in range(3) for j in range(2)) / 6 for b in range(2)]
    torch.testing.assert_close(head_nll("categorical", logits, x).double(), torch.tensor(want).double())

    p = torch.randn(2, 20, 1, 2)
    p[:, 8:14] = -2 + 0.5 * p[:, 8:14]  # log-scales around -2
    want = torch.tensor([brute_force_dmol_nll(p[b, :, 0].double(), x[b, :, 0]) for b in range(2)])
    torch.testing.assert_close(head_nll("mix", p, x, 2).double(), want.double(), rtol=1e-5, atol=1e-6)
    # Sharpest logistics, targets 1-3 bins off the peak: tail bins of mass 1e-4..1e-11, exact in log space.
    y = edge_rich_images()[:, :, :1, :2]
    p = peaked_at(y, n=2)
    y = (y.long() + torch.tensor([1, -2, 3]).view(1, 3, 1, 1)).clamp(0, 255).to(torch.uint8)
    want = torch.tensor([brute_force_dmol_nll(p[b, :, 0].double(), y[b, :, 0]) for b in range(3)])
    torch.testing.assert_close(head_nll("mix", p, y, 2).double(), want.double(), rtol=1e-5, atol=1e-6)


def test_units_exact():
    assert bits_per_dim(3.5 * math.log(2)) == pytest.approx(3.5, rel=1e-15)
    readme = [(8, 8, 5, 32), (4, 4, 5, 32), (2, 2, 5, 32)]
    assert uniform_code_bits(readme, (32, 32)) == 2100 / 3072 == 0.68359375
    assert uniform_code_bits([(2 * h, 2 * w, m, k) for h, w, m, k in readme], (64, 64)) == 0.68359375
    assert uniform_code_bits([(2, 1, 3, 3)], (2, 2)) == pytest.approx(6 * math.log2(3) / 12, rel=1e-15)


@pytest.mark.parametrize("head,channels", [("mix", 30), ("categorical", 768), ("mse", 3)])
def test_fp32_inside_bf16_autocast(head, channels):
    torch.manual_seed(0)
    params, x = torch.randn(2, channels, 3, 3), torch.randint(0, 256, (2, 3, 3, 3), dtype=torch.uint8)
    plain = head_nll(head, params, x, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = head_nll(head, params, x, 3)
        from_bf16 = head_nll(head, params.bfloat16(), x, 3)
    assert inside.dtype == from_bf16.dtype == torch.float32 and torch.equal(inside, plain)
    assert torch.equal(from_bf16, head_nll(head, params.bfloat16().float(), x, 3))


def test_mse_head_loss_and_round_trip():
    x = edge_rich_images()
    centres = x.float() / 127.5 - 1
    assert torch.equal(head_reconstruct("mse", centres), x)
    torch.testing.assert_close(head_nll("mse", centres + 0.5, x), torch.full((3,), 0.25))


def test_gradients_finite_for_extreme_parameters():
    log_scales = torch.tensor([-50.0, 100.0]).repeat(2, 3).view(2, 6, 1, 1)  # below the clamp, absurdly wide
    params = torch.cat(
        [torch.zeros(2, 2, 1, 1), torch.full((2, 6, 1, 1), 1000.0), log_scales, torch.zeros(2, 6, 1, 1)], 1
    )
    params.requires_grad_(True)
    x = torch.tensor([[0, 128, 255], [255, 1, 0]], dtype=torch.uint8).view(2, 3, 1, 1)
    head_nll("mix", params, x, 2).sum().backward()
    assert torch.isfinite(params.grad).all()


def u8(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: head_nll("mix", torch.zeros(1, 30, 2, 2), torch.zeros(1, 3, 2, 2), 3), "x must be a uint8"),
        (lambda: head_nll("mix", torch.zeros(1, 30, 2, 2), u8(1, 1, 2, 2), 3), "x must be a uint8"),
        (lambda: head_nll("mix", torch.zeros(1, 30, 2, 2), u8(2, 3, 2, 2), 3), "x of shape"),
        (lambda: head_nll("mix", torch.zeros(1, 90, 2, 2), u8(1, 3, 2, 2)), r"params must .* \(B, 100, H, W\)"),
        (lambda: head_nll("mix", torch.zeros(1, 30, 2, 2, dtype=torch.long), u8(1, 3, 2, 2), 3), "params"),
        (lambda: head_reconstruct("gaussian", torch.zeros(1, 3, 2, 2)), "head must be one of"),
        (lambda: head_sample("mix", torch.zeros(1, 10, 2, 2), 0), "num_mixtures"),
        (lambda: head_sample("mse", torch.zeros(1, 3, 2, 2)), "mse"),
        (lambda: head_sample("categorical", torch.zeros(1, 768, 2, 2), temperature=-1.0), "temperature"),
        (lambda: dmol_nll(torch.zeros(1, 25, 2, 2), u8(1, 3, 2, 2)), r"\(B, 10\*num_mixtures, H, W\)"),
        (lambda: uniform_code_bits([(8, 8, 5)], (32, 32)), r"\(h, w, M, K\) per level"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
