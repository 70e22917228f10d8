"""The experiment scripts: statistics on hand-computed cases, the two split axes element by element, k-means
to convergence on known clusters, and every script's --smoke run through the real training code, writing
its JSON, markdown and PNG (the analysis scripts read the nets the smoke DQ-vs-VQ grid trained)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import REPO

EXPERIMENTS = REPO / "experiments"


def load(name: str):
    """Import experiments/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


common = load("common")
sys.modules.setdefault("common", common)
split_axis = load("split_axis")
correlation = load("correlation")

# ---------------------------------------------------------------------------------------------------
# statistics, by hand
# ---------------------------------------------------------------------------------------------------


def test_mean_std_uses_the_sample_standard_deviation():
    mean, std = common.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+.25+.25+2.25 = 5, / 3
    assert common.mean_std([7.0]) == (7.0, 0.0)
    assert common.fmt_mean_std([1.0, 3.0], 2) == "2.00 ± 1.41"
    with pytest.raises(ValueError, match="at least one value"):
        common.mean_std([])


def test_entropy_in_bits_of_histograms():
    counts = torch.tensor([[1, 1, 1, 1], [2, 0, 0, 2], [5, 0, 0, 0], [1, 1, 2, 0]])
    expected = torch.tensor([2.0, 1.0, 0.0, 1.5], dtype=torch.float64)  # last: -(2 * .25 log2 .25 + .5 log2 .5)
    assert torch.allclose(common.entropy_bits(counts), expected)


def test_pearson_correlation_and_mean_absolute_off_diagonal():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, -1.0, -1.0, 1.0])  # centred a = (-1.5, -.5, .5, 1.5): a.b = 0, so r = 0
    x = torch.stack([a, 2 * a + 1, -a, b], dim=1)  # (N=4, V=4)
    r = common.correlation_matrix(x)
    expected = torch.tensor([[1, 1, -1, 0], [1, 1, -1, 0], [-1, -1, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert torch.allclose(r, expected, atol=1e-12)
    # off-diagonal |r|: pairs (a,2a+1)=1, (a,-a)=1, (2a+1,-a)=1, three pairs with b = 0 -> mean 3/6
    assert common.mean_abs_off_diagonal(r) == pytest.approx(0.5)
    constant = common.correlation_matrix(torch.stack([a, torch.ones(4), -a], dim=1))
    assert constant[1].isnan().all() and common.mean_abs_off_diagonal(constant) == pytest.approx(1.0)


def test_mutual_information_of_codes():
    same = torch.tensor([0, 1, 0, 1])
    assert correlation.mutual_information_bits(same, same, 2) == pytest.approx(1.0)  # H = 1 bit, fully shared
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])  # every pair once: independent
    assert correlation.mutual_information_bits(a, b, 2) == pytest.approx(0.0, abs=1e-12)
    codes = torch.stack([same, same, a]).view(1, 3, 2, 2)  # (N=1, M=3, 2, 2): pair MI 1, 0, 0
    dep = correlation.code_dependence(codes, 2)
    assert dep["mi_bits"] == pytest.approx(1 / 3) and dep["entropy_bits"] == pytest.approx(1.0)


def test_channel_vs_spatial_correlation_on_a_built_case():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, -1.0, -1.0, 1.0])
    features = torch.zeros(4, 2, 1, 2)  # (N, C, h, w): position 0 holds a, position 1 holds b
    features[:, 0, 0, 0], features[:, 0, 0, 1] = a, b
    features[:, 1] = 3 * features[:, 0]  # channel 1 = 3 x channel 0 at every position
    figures = correlation.channel_and_spatial_correlation(features)
    assert figures["channel"] == pytest.approx(1.0) and figures["spatial"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# the split-axis experiment's parts
# ---------------------------------------------------------------------------------------------------


def test_channel_and_spatial_splits_take_every_element_once():
    f = torch.arange(16.0).view(1, 4, 2, 2)  # (N=1, C=4, h=2, w=2): element (c, p) = 4c + p
    channel = split_axis.split_vectors(f, "channel", 2)  # codebook m: channels 2m, 2m+1 at each position
    assert channel.tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]], [[8, 12], [9, 13], [10, 14], [11, 15]]]
    spatial = split_axis.split_vectors(f, "spatial", 2)  # codebook m: grid row m of each channel
    assert spatial.tolist() == [[[0, 1], [4, 5], [8, 9], [12, 13]], [[2, 3], [6, 7], [10, 11], [14, 15]]]
    for v in (channel, spatial):
        assert sorted(v.flatten().tolist()) == list(range(16))
    with pytest.raises(ValueError, match="not divisible by M=3"):
        split_axis.split_vectors(f, "channel", 3)


def test_kmeans_converges_to_the_cluster_means():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    x = (centres.unsqueeze(1) + offsets.unsqueeze(0)).reshape(1, 8, 2).repeat(2, 1, 1)  # (M=2, N=8, D=2)
    cb, iters = split_axis.fit_kmeans(x, 2, seed=0)
    assert iters < 10
    for m in range(2):
        assert sorted(cb.embed[m].tolist()) == [[0.0, 0.0], [10.0, 10.0]]
    figures = split_axis.quantization_figures(cb, x)
    assert figures["mse"] == pytest.approx(0.5)  # every point is 1 from its centre in one of 2 coordinates
    assert figures["entropy_bits"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------
# the scripts, end to end on synthetic data
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dq_vs_vq")
    load("dq_vs_vq").main(["--smoke", "--seeds", "1", "--sweep-seeds", "1", "--jobs", "2", "--out", str(out)])
    return out


def test_dq_vs_vq_smoke_trains_every_run_through_the_cli_and_writes_its_outputs(grid_run):
    summary = json.loads((grid_run / "dq_vs_vq.json").read_text())
    names = sorted(r["name"] for r in summary["runs"])
    assert names == [
        "dq_default_M4_seed0",
        "dq_kaiming_M1_seed0",
        "dq_kaiming_M2_seed0",
        "dq_kaiming_M4_seed0",
        "dq_kaiming_M8_seed0",
        "vq_default_M4_seed0",
        "vq_kaiming_M4_seed0",
    ]
    for run in summary["runs"]:
        m = run["spec"]["num_codebooks"]
        assert run["steps"] == 4 and run["net_kwargs"]["code_dim"] * m == 8  # M*D fixed
        assert [p["step"] for p in run["curve"]] == [1, 2, 3, 4]
        # B - A is the uniform code cost: grids 1, 4, 16 positions x M codes x log2 8 bits / (3*16*16) dims
        assert run["B"] - run["A"] == pytest.approx(21 * m * 3 / 768, abs=1e-5)
        assert all(0 < u <= 1 for u in run["used"]) and all(1 <= p <= 8 for p in run["perplexity"])
        run_dir = grid_run / "runs" / run["name"]  # a run directory like any other: config, record, checkpoints
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        net = config["model"]["init_args"]["net"]["init_args"]
        assert (net["mode"], net["num_codebooks"], config["seed_everything"]) == (run["spec"]["mode"], m, 0)
        assert (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    md = (grid_run / "dq_vs_vq.md").read_text()
    assert "| dq | kaiming | 1 |" in md and "| vq | default | 1 |" in md and "| 8 | 1 | 8 | 1 |" in md
    assert (grid_run / "dq_vs_vq_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_dq_vs_vq_summarize_only_lists_the_missing_runs(grid_run):
    summary = load("dq_vs_vq").main(
        ["--smoke", "--seeds", "2", "--sweep-seeds", "1", "--summarize-only", "--out", str(grid_run)]
    )
    assert summary["missing"] == ["dq_kaiming_M4_seed1", "vq_kaiming_M4_seed1"]
    assert "Not run (budget): dq_kaiming_M4_seed1, vq_kaiming_M4_seed1" in (grid_run / "dq_vs_vq.md").read_text()


def test_analyses_read_the_trained_runs(grid_run, tmp_path):
    runs = ["--runs", str(grid_run / "runs")]
    summary = split_axis.main([*runs, "--restarts", "2", "--codebook-size", "8", "--out", str(tmp_path / "split")])
    for result in summary["results"].values():
        for axis in ("channel", "spatial"):
            for row in result[axis]:
                assert row["code_dim"] == 2 and row["fit_vectors"] == 96 * 16  # same D and sample count both ways
                assert 0 <= row["entropy_bits"] <= 3 and row["iterations"] < 200 and row["relative_mse"] >= 0
    assert "| channel |" in (tmp_path / "split" / "split_axis.md").read_text()
    summary = correlation.main([*runs, "--seeds", "1", "--out", str(tmp_path / "corr")])
    assert set(summary["figures"]) == {"trained dq", "trained vq", "random init, dq"}
    for figures in summary["figures"].values():
        assert 0 <= figures[0]["channel"] <= 1 and 0 <= figures[0]["mi_bits"] <= figures[0]["entropy_bits"] + 1e-9
    assert (tmp_path / "corr" / "correlation_maps.png").read_bytes()[:4] == b"\x89PNG"
    levels = load("level_decoding").main([*runs, "--out", str(tmp_path / "lev")])
    assert list(levels["mse"]["dq"]) == ["all levels", "level 0 alone", "level 1 alone", "level 2 alone"]
    assert (tmp_path / "lev" / "level_decoding.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_runs_are_named_in_the_error(tmp_path):
    with pytest.raises(common.CheckpointError, match=str(tmp_path)):
        common.trained_net(tmp_path / "dq_kaiming_M4_seed0")


def test_demo_pipeline_smoke_ema_leaves_the_raw_training_alone(tmp_path):
    load("demo_pipeline").main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "demo_pipeline.json").read_text())
    off, on = result["runs"]
    assert (off["ema_decay"], on["ema_decay"]) == (0.0, 0.99) and off["val_A_raw"] is None
    # the same seed, data and steps: the EMA run's raw weights are the weights of the run without EMA
    assert on["val_A_raw"] == pytest.approx(off["val_A"], abs=1e-6) and on["val_A"] != off["val_A"]
    assert off["whole_split"] and on["whole_split"] and on["coded"] is None  # the codec runs once
    assert off["coded"]["images"] == off["test_images"] == 24
    assert off["coded"]["bpd_estimated"] == pytest.approx(off["test"]["C bpd_prior"], abs=1e-4)  # the same C
    assert off["coded"]["bpd_coded"] > off["coded"]["bpd_estimated"]  # 24 tiny images: the file header shows
    assert set(result["general_codecs"]) == {"PNG", "WebP lossless"}
    trip = result["round_trip"]
    assert trip["pixel_identical"] == trip["images"] == 24 and trip["bytes"] == trip["report_bytes"]
    assert "| EMA decay |" in (tmp_path / "demo_pipeline.md").read_text()


def test_verdict_rule_on_differences_with_known_intervals():
    verdicts = load("verdicts")
    # d = 1, 2, 3: mean 2, sample std 1, half width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.484
    v = verdicts.verdict([1.0, 2.0, 3.0])
    assert v["mean"] == pytest.approx(2.0) and v["std"] == pytest.approx(1.0)
    assert v["ci95"] == pytest.approx([2.0 - 2.4844, 2.0 + 2.4844], abs=1e-3)
    assert v["verdict"] == "inconclusive" and v["dq_worse_in"] == 3
    # d = -6, -5, -4: -5 +- 2.48 = [-7.48, -2.52], all below 0
    assert verdicts.verdict([-6.0, -5.0, -4.0])["verdict"] == "holds"
    assert verdicts.verdict([4.0, 5.0, 6.0])["verdict"] == "does not hold"
    assert verdicts.verdict([-0.1])["verdict"].startswith("inconclusive")
    # the mean paired curve flips sign at the first step of the new sign
    dq = [{"step": 1, "A": 5.0}, {"step": 2, "A": 4.0}, {"step": 3, "A": 3.0}]
    vq = [{"step": 1, "A": 4.5}, {"step": 2, "A": 4.5}, {"step": 3, "A": 3.5}]
    curve, flips = verdicts.sign_changes({0: (dq, vq)}, "A")
    assert curve == [(1, 0.5), (2, -0.5), (3, -0.5)] and flips == [2]


def test_curve_band_over_runs_that_stopped_at_different_steps():
    dq_vs_vq = load("dq_vs_vq")
    # run 0 stops early at step 2000 (--stop-delta), run 1 validates at 1000, 2000 and 3000, recorded at 3001 (a run
    # continued before the ResumeCheckpoint fix): the band at 3000 is run 1 alone
    runs = [
        {"curve": [{"step": 1000, "A": 5.0}, {"step": 2000, "A": 4.0}]},
        {"curve": [{"step": 1000, "A": 6.0}, {"step": 2000, "A": 5.0}, {"step": 3001, "A": 4.5}]},
    ]
    steps, mean, std, n = dq_vs_vq.band(runs, "A")
    assert steps == [1000, 2000, 3000] and n == [2, 2, 1]
    assert mean == pytest.approx([5.5, 4.5, 4.5])
    assert std == pytest.approx([math.sqrt(0.5), math.sqrt(0.5), 0.0])  # sample std of two values 1 apart


def test_runs_stopped_at_different_steps_are_compared_last_best_and_at_the_last_common_step():
    verdicts = load("verdicts")
    # DQ stopped at 2000; VQ went on to 3000 and ended on a bump above its best (4.0 at step 2000)
    dq = {"A": 4.5, "mse": 0.02, "curve": [{"step": 1000, "A": 5.0}, {"step": 2000, "A": 4.5}]}
    vq = {"A": 4.8, "mse": 0.01, "curve": [{"step": s, "A": a} for s, a in ((1000, 5.5), (2000, 4.0), (3000, 4.8))]}
    values = verdicts.compared_values(dq, vq)
    assert values == {"A": (4.5, 4.8), "A_best": (4.5, 4.0), "A_matched": (4.5, 4.0), "mse": (0.02, 0.01)}
