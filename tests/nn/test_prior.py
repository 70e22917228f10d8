"""CodePrior: geometry, exact uniform cost at init, causality, cached sampling == teacher forcing == uncached
sampling, learning a structured code distribution, two resolutions with one set of weights, greedy limit of
the temperature, dropout off while sampling, state_dict round trip, argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dq.nn.codes import CodeGeometry
from lightning_dq.nn.prior import CodePrior

# tiny geometry: levels of K=8 and K=6 (top first), M=2, bottom grid = side / 2
# resolution 8 -> grids 2x2, 4x4 (T = 40); resolution 16 -> 4x4, 8x8 (T = 160)
SIZES, M, DOWN = [8, 6], 2, 2
GEOMETRY = CodeGeometry(tuple(SIZES), M, DOWN)


def grids(prior: CodePrior, resolution: int) -> list[tuple[int, int]]:
    return [(h, w) for h, w, _, _ in prior.geometry.shapes(resolution)]


@pytest.fixture(autouse=True)
def one_thread():
    """These are tiny tensors: on a shared 2-core machine, intra-op threads only add spin-wait overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_prior(random_heads: bool = True, **kwargs) -> CodePrior:
    """A small prior; with random_heads its predictions are not uniform, so tests can see them."""
    torch.manual_seed(0)
    args = dict(dim=32, depth=2, heads=2, max_grid=8) | kwargs
    prior = CodePrior(GEOMETRY, **args)
    if random_heads:
        with torch.no_grad():
            for head in prior.level_heads:
                head.weight.normal_()
                head.bias.normal_()
    return prior


def random_codes(prior: CodePrior, b: int, resolution: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = prior.geometry.shapes(resolution)
    return [torch.randint(0, k, (b, m, h, w), generator=g) for h, w, m, k in shapes]


def per_position(levels: list[torch.Tensor], prior: CodePrior, level: int) -> torch.Tensor:
    """One level's (B, M, h, w, K) logits as (B, h*w*M, K) in sequence order."""
    return prior.geometry.flatten([levels[level]])


def test_grid_shapes_readme_preset() -> None:
    prior = CodePrior(CodeGeometry((32, 32, 32), 5, 4), dim=16, depth=1, heads=2)
    assert grids(prior, 32) == [(2, 2), (4, 4), (8, 8)]
    assert grids(prior, 64) == [(4, 4), (8, 8), (16, 16)]
    assert prior.geometry.sequence_length(32) == (4 + 16 + 64) * 5 == 420
    assert prior.geometry.sequence_length(64) == (16 + 64 + 256) * 5 == 1680


def test_flatten_order_and_round_trip() -> None:
    prior = tiny_prior()
    codes = random_codes(prior, 2, 8)
    flat = prior.geometry.flatten(codes)  # (2, 40)
    # order: level (top first), then row, column, codebook
    assert flat[1, 0] == codes[0][1, 0, 0, 0] and flat[1, 1] == codes[0][1, 1, 0, 0]
    assert flat[1, 2] == codes[0][1, 0, 0, 1] and flat[1, 4] == codes[0][1, 0, 1, 0]
    assert flat[1, 8 + 2 * (4 * 3 + 1) + 1] == codes[1][1, 1, 3, 1]  # bottom level, row 3, col 1, m 1
    back = prior.geometry.unflatten(flat, 8)
    assert all(torch.equal(a, b) for a, b in zip(back, codes, strict=True))


@pytest.mark.parametrize("resolution", [8, 16])
def test_fresh_prior_is_exactly_uniform(resolution: int) -> None:
    prior = tiny_prior(random_heads=False)
    codes = random_codes(prior, 3, resolution)
    levels = zip(grids(prior, resolution), SIZES, strict=True)
    expected = -sum(h * w * M * math.log(k) for (h, w), k in levels)  # nats, computed in float64
    lp = prior.log_prob(codes)
    assert lp.shape == (3,) and lp.dtype == torch.float32
    assert torch.allclose(lp.double(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_readme_preset_is_uniform_at_both_resolutions() -> None:
    prior = CodePrior(CodeGeometry((32, 32, 32), 5, 4), dim=16, depth=1, heads=2)
    for resolution, tokens in [(32, 420), (64, 1680)]:
        lp = prior.log_prob(random_codes(prior, 2, resolution))
        assert torch.allclose(lp.double(), torch.tensor(-tokens * math.log(32)).double(), rtol=1e-6, atol=0)


def test_logits_depend_only_on_earlier_codes() -> None:
    prior = tiny_prior()
    codes = random_codes(prior, 1, 8)
    x = prior.embed(codes).detach().requires_grad_(True)  # (1, T, dim): position p holds code p-1
    levels = prior.logits_from_embeddings(x, 8)
    flat = torch.cat([per_position(levels, prior, lv).sum(-1) for lv in range(2)], 1)  # (1, T)
    t = flat.shape[1]
    for i in range(t):
        (grad,) = torch.autograd.grad(flat[0, i], x, retain_graph=True)  # (1, T, dim)
        seen = grad[0].abs().sum(-1)  # (T,)
        assert torch.all(seen[i + 1 :] == 0), f"logits at {i} depend on codes at >= {i}"
        assert torch.all(seen[: i + 1] > 0), f"logits at {i} ignore some earlier position"
    # the same from the codes' side: changing code j leaves every prediction up to j bit-identical
    j = 17  # a bottom-level position (the top level holds 8 codes)
    base = torch.cat([per_position(prior.logits(codes), prior, lv) for lv in range(1, 2)], 1)  # (1, 32, K)
    flat_codes = prior.geometry.flatten(codes)
    flat_codes[0, j] = (flat_codes[0, j] + 1) % SIZES[1]
    changed = torch.cat([per_position(prior.logits(prior.geometry.unflatten(flat_codes, 8)), prior, 1)], 1)
    jj = j - 8  # index within the bottom level
    assert torch.equal(base[:, : jj + 1], changed[:, : jj + 1])
    assert not torch.allclose(base[:, jj + 1], changed[:, jj + 1])


@pytest.mark.parametrize("resolution", [8, 16])
def test_cached_sampling_matches_teacher_forcing_and_uncached(resolution: int) -> None:
    prior = tiny_prior()
    flat, steps = prior.generate(3, resolution, generator=torch.Generator().manual_seed(5))
    codes = prior.geometry.unflatten(flat, resolution)
    teacher = prior.logits(codes)
    start = 0
    for lv in range(2):
        tf = per_position(teacher, prior, lv)  # (3, n_l, K_l)
        drawn = torch.stack(steps[start : start + tf.shape[1]], 1)  # (3, n_l, K_l)
        assert torch.allclose(drawn, tf, atol=1e-4, rtol=0)
        start += tf.shape[1]
    assert start == len(steps) == prior.geometry.sequence_length(resolution)
    flat2, steps2 = prior.generate(3, resolution, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(flat2, flat)
    assert torch.allclose(torch.cat(steps2, 1), torch.cat(steps, 1), atol=1e-4, rtol=0)


def structured_codes(b: int, g: torch.Generator) -> list[torch.Tensor]:
    """Top level (s + row + col + m) % 8 with one random s per image; the bottom level copies its parent.
    Given the first code everything is determined: the ideal cost is ln 8 per image."""
    s = torch.randint(0, 8, (b, 1, 1, 1), generator=g)
    r, c = torch.arange(2).view(1, 1, 2, 1), torch.arange(2).view(1, 1, 1, 2)  # row, column
    m = torch.arange(M).view(1, M, 1, 1)
    top = (s + r + c + m) % 8  # (b, M, 2, 2)
    bottom = top.repeat_interleave(2, 2).repeat_interleave(2, 3)  # (b, M, 4, 4)
    return [top, bottom]


def test_learns_structured_codes() -> None:
    torch.manual_seed(0)
    prior = CodePrior(CodeGeometry((8, 8), M, DOWN), dim=32, depth=1, heads=2, max_grid=4)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = -prior.log_prob(structured_codes(32, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    with torch.no_grad():
        nats = -prior.log_prob(structured_codes(256, g)).mean().item()
    uniform = prior.geometry.sequence_length(8) * math.log(8)
    assert nats < 0.1 * uniform, f"{nats / uniform:.3f} of the uniform cost after training"


def test_same_weights_sample_two_resolutions() -> None:
    prior = tiny_prior()
    for resolution in (8, 16):
        codes = prior.sample(2, resolution, generator=torch.Generator().manual_seed(0))
        assert [tuple(c.shape) for c in codes] == [(2, M, h, w) for h, w in grids(prior, resolution)]
        for c, k in zip(codes, SIZES, strict=True):
            assert c.dtype == torch.int64 and 0 <= int(c.min()) and int(c.max()) < k
        assert torch.isfinite(prior.log_prob(codes)).all()


def test_tiny_temperature_is_argmax() -> None:
    prior = tiny_prior()
    a = prior.sample(2, 8, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    b = prior.sample(2, 8, temperature=1e-6, generator=torch.Generator().manual_seed(1))
    greedy = prior.sample(2, 8, temperature=0.0)
    for x, y, z, logits in zip(a, b, greedy, prior.logits(a), strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
        assert torch.equal(x, logits.argmax(-1))  # every code is the most likely one given those before


def test_sampling_runs_without_dropout_and_restores_mode() -> None:
    prior = tiny_prior(dropout=0.5)
    prior.train()
    a, _ = prior.generate(2, 8, generator=torch.Generator().manual_seed(3))
    b, _ = prior.generate(2, 8, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and prior.training


def test_state_dict_round_trip() -> None:
    prior = tiny_prior()
    other = CodePrior(GEOMETRY, dim=32, depth=2, heads=2, max_grid=8)
    other.load_state_dict(prior.state_dict())
    codes = random_codes(prior, 2, 16)
    assert torch.equal(other.log_prob(codes), prior.log_prob(codes))


@pytest.mark.parametrize(
    "kwargs, match", [(dict(dim=30, heads=4), "heads dividing dim"), (dict(dropout=1.0), "dropout")]
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodePrior(GEOMETRY, **(dict(dim=32, heads=2) | kwargs))


def test_bad_inputs() -> None:
    prior = tiny_prior()
    with pytest.raises(ValueError, match="multiple of 4"):
        grids(prior, 10)
    with pytest.raises(ValueError, match="max_grid=8"):
        prior.log_prob(random_codes(prior, 1, 32))  # bottom grid 16x16
    good = random_codes(prior, 2, 8)
    with pytest.raises(ValueError, match="list of 2 tensors"):
        prior.log_prob(good[:1])
    with pytest.raises(ValueError, match=r"int64"):
        prior.log_prob([good[0].int(), good[1]])
    shape_error = r"codes\[0\] \(level 0, top first\) must have shape \(B, M, h, w\) = \(2, 2, 2, 2\)"
    with pytest.raises(ValueError, match=shape_error):
        prior.log_prob([good[0][:, :, :1], good[1]])
    with pytest.raises(ValueError, match=r"codes\[1\].*\(2, 2, 4, 4\)"):
        prior.log_prob([good[0], good[1][:, :1]])
    with pytest.raises(ValueError, match=r"codes\[-1\].*6x6 images"):
        prior.log_prob([good[0], good[1][..., :3, :3]])
    # the value range syncs the host, so it is checked where codes come from outside (files), not per training step
    with pytest.raises(ValueError, match=r"codes\[1\].*\[0, 6\)"):
        prior.geometry.check_codes([good[0], good[1].clone().fill_(6)], values=True)
    with pytest.raises(ValueError, match=r"codes\[0\].*\[0, 8\), got min -1"):
        prior.geometry.check_codes([good[0].clone().fill_(-1), good[1]], values=True)
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(1, 8, temperature=-1.0)
    with pytest.raises(ValueError, match="n >= 1"):
        prior.sample(0, 8)
    with pytest.raises(ValueError, match="num_tokens"):
        prior.generate(1, 8, num_tokens=41)
