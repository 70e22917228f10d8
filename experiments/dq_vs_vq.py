"""DQ vs VQ at identical codebook memory and decoder width, the number of codebooks M at fixed memory, and the
initialisation question (PyTorch default vs `init: kaiming`), each run a `lightning-dq fit` of the experiments
preset (configs/experiments.yaml) for a fixed number of STEPS.

    .venv/bin/python experiments/dq_vs_vq.py --data-root ~/data --out runs/exp/dq_vs_vq      # the default grid
    .venv/bin/python experiments/dq_vs_vq.py --smoke --out /tmp/smoke                            # synthetic, seconds

Runs (M = 4 codebooks of D = 16: M*D = 64 channels out of every quantizer, K = 32 codes per codebook and level):

- main: mode dq and vq, `--init`, seeds 0..`--seeds`-1;
- init: the other init, both modes, the first `--sweep-seeds` seeds;
- sweep: mode dq, M in {1, 2, 8} with D = 64 / M (M*K*D constant; M = 4 is the main run), first `--sweep-seeds` seeds.

"vq" is the official code's baseline: one D-vector per position shown to all M codebooks, the results concatenated:
the same codebook memory (M*K*D) and decoder input width (M*D) as "dq". Every run validates on the same held-out
images `--val-points` times, in the same data order (the data seed is the preset's); the seed sets the weights.
Each run is a run directory `runs/<name>/` under --out (config.yaml, metrics.csv written as it trains, checkpoints,
W&B offline run); an interrupted run continues from its last checkpoint, a finished one (`result.json`) is read
back, so an interrupted grid resumes where it stopped. With `--stop-delta`, a run also stops once validation A
improves by no more than that between two validations. The summary is `dq_vs_vq.json`, `.md` and `_curves.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SMOKE,
    data_note,
    fit_run,
    fmt_mean_std,
    markdown_table,
    mean_std,
    on_schedule,
    trained_net,
    validation_points,
    write_outputs,
)

from lightning_dq.nn.autoencoder import count_parameters  # noqa: E402

SWEEP_M = (1, 2, 4, 8)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    group: str  # "main", "init" or "sweep"
    mode: str
    init: str
    num_codebooks: int
    code_dim: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.init}_M{self.num_codebooks}_seed{self.seed}"


def main_codebooks(width: int) -> int:
    """M of the main comparison for a quantizer output width M*D: 4 when it divides the width, else 1."""
    return 4 if width % 4 == 0 else 1


def grid(seeds: int, sweep_seeds: int, init: str, width: int) -> list[RunSpec]:
    """The runs, main first (each unique; the sweep's M = 4 point is the main dq run)."""
    other = "default" if init == "kaiming" else "kaiming"
    m_main = main_codebooks(width)
    runs = [RunSpec("main", mode, init, m_main, width // m_main, s) for s in range(seeds) for mode in ("dq", "vq")]
    runs += [
        RunSpec("init", mode, other, m_main, width // m_main, s) for s in range(sweep_seeds) for mode in ("dq", "vq")
    ]
    sweep = [m for m in SWEEP_M if m != m_main and width % m == 0]
    return runs + [RunSpec("sweep", "dq", init, m, width // m, s) for s in range(sweep_seeds) for m in sweep]


def claim(run_dir: Path) -> bool:
    """Mark run_dir as trained by this process; False when a live process holds it already (so several invocations
    can share one --out without training a run twice)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "claim"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
            os.kill(pid, 0)  # raises when no such process: a stale claim of an interrupted run
            return pid == os.getpid()
        except (ValueError, ProcessLookupError):
            path.write_text(str(os.getpid()))
            return True
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def overrides(spec: RunSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """The CLI overrides of one run on top of the experiments preset."""
    net = "model.init_args.net.init_args"
    values = {
        "seed_everything": spec.seed,
        f"{net}.mode": spec.mode,
        f"{net}.init": spec.init,
        f"{net}.num_codebooks": spec.num_codebooks,
        f"{net}.code_dim": spec.code_dim,
        "trainer.max_steps": cfg["steps"],
        "trainer.val_check_interval": cfg["every"],
        "resume.every_n_train_steps": cfg["every"],
    }
    if cfg["data_root"]:
        values["data.init_args.root"] = cfg["data_root"]
    if cfg["stop_delta"] is not None:  # stop once A improves by no more than stop_delta between two validations
        stop = {
            "monitor": "val/bpd_decoder",
            "min_delta": cfg["stop_delta"],
            "patience": 1,
            "check_on_train_epoch_end": False,
        }
        values["trainer.callbacks+"] = json.dumps(
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": stop}
        )
    return values | (SMOKE if cfg["smoke"] else {})


def train_one(spec: RunSpec, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Train one run (or continue it, or read its result) and return its result; None when another process has it."""
    run_dir = Path(cfg["out"]) / "runs" / spec.name
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if not claim(run_dir):
        print(f"[dq_vs_vq] {spec.name}: trained by another process, skipped here", flush=True)
        return None
    start = time.time()
    values = overrides(spec, cfg)
    if cfg["smoke"]:  # the metric record only: no W&B process to start for seconds-long runs
        values |= {
            "trainer.logger": "lightning_dq.reporting.record.RunRecord",
            "trainer.logger.init_args.save_dir": run_dir,
        }
    fit_run(run_dir, values, cfg["threads"])
    points = validation_points(run_dir)
    final = points[-1]
    levels = sum(1 for key in final if key.startswith("val/codes_used_l"))
    net = trained_net(run_dir)
    result = {
        "spec": asdict(spec),
        "name": spec.name,
        "net_kwargs": net.config,
        "parameters": count_parameters(net),
        "steps": final["trained_steps"],
        "batch_size": cfg["batch_size"],
        "val_images": int(final["val/num_images"]),
        "data": data_note(run_dir),
        "wall_seconds": round(time.time() - start, 1),  # of this invocation (a resumed run: the rest only)
        "A": final["val/bpd_decoder"],
        "B": final["val/bpd_uniform"],
        "mse": final["val/mse"],
        "perplexity": [final[f"val/codes_perplexity_l{i}"] for i in range(levels)],
        "used": [final[f"val/codes_used_l{i}"] for i in range(levels)],
        "curve": [
            {"step": p["trained_steps"], "A": p["val/bpd_decoder"], "B": p["val/bpd_uniform"], "mse": p["val/mse"]}
            for p in points
        ],
    }
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "claim").unlink(missing_ok=True)
    perplexity = [round(p, 1) for p in result["perplexity"]]
    print(
        f"[dq_vs_vq] {spec.name}: A={result['A']:.3f} B={result['B']:.3f} mse={result['mse']:.4f} "
        f"perplexity={perplexity} ({result['wall_seconds']} s)",
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------


def cell_row(label: list[str], results: list[dict[str, Any]]) -> list[str]:
    """A table row of mean ± std over seeds: A, B, MSE, perplexity and used codes per level (top first)."""
    levels = len(results[0]["perplexity"])
    row = [*label, str(len(results))]
    row += [fmt_mean_std([r[k] for r in results], 4 if k == "mse" else 3) for k in ("A", "B", "mse")]
    row.append(" / ".join(f"{mean_std([r['perplexity'][i] for r in results])[0]:.1f}" for i in range(levels)))
    row.append(" / ".join(f"{100 * mean_std([r['used'][i] for r in results])[0]:.0f}%" for i in range(levels)))
    return row


def paired_difference(results: list[dict[str, Any]], a: dict, b: dict, key: str) -> dict[str, float] | None:
    """Per-seed difference key(a) - key(b) between two cells (matched by seed): mean, std, n."""

    def by_seed(sel: dict) -> dict[int, float]:
        return {r["spec"]["seed"]: r[key] for r in results if all(r["spec"][k] == v for k, v in sel.items())}

    xa, xb = by_seed(a), by_seed(b)
    diffs = [xa[s] - xb[s] for s in sorted(set(xa) & set(xb))]
    if not diffs:
        return None
    mean, std = mean_std(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "per_seed": diffs}


def summarize(results: list[dict[str, Any]], cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The summary JSON and markdown: main, init and M-sweep tables and the paired DQ - VQ differences."""

    def select(**sel: Any) -> list[dict[str, Any]]:
        return [r for r in results if all(r["spec"][k] == v for k, v in sel.items())]

    main_init, m_main = cfg["init"], main_codebooks(cfg["width"])
    header = [
        "mode",
        "init",
        "seeds",
        "val A (bits/dim)",
        "val B (bits/dim)",
        "val MSE",
        "perplexity (top/mid/bottom)",
        "codes used (top/mid/bottom)",
    ]
    inits = [main_init] + sorted({r["spec"]["init"] for r in results} - {main_init})
    main_rows, init_rows, diffs = [], [], {}
    for init in inits:
        for mode in ("dq", "vq"):
            cell = select(mode=mode, init=init, num_codebooks=m_main)
            if cell:
                (main_rows if init == main_init else init_rows).append(cell_row([mode, init], cell))
        for key in ("A", "B", "mse"):
            d = paired_difference(
                results,
                dict(mode="dq", init=init, num_codebooks=m_main),
                dict(mode="vq", init=init, num_codebooks=m_main),
                key,
            )
            if d:
                diffs[f"dq-vq {key} ({init})"] = d
    for mode in ("dq", "vq"):
        for key in ("A", "mse"):
            d = paired_difference(
                results,
                dict(mode=mode, init="default", num_codebooks=m_main),
                dict(mode=mode, init="kaiming", num_codebooks=m_main),
                key,
            )
            if d:
                diffs[f"default-kaiming {key} ({mode})"] = d
    sweep_rows = []
    for m in SWEEP_M:
        cell = select(mode="dq", init=main_init, num_codebooks=m)
        if cell:
            k = cell[0]["net_kwargs"]["codebook_sizes"][0]
            sweep_rows.append(cell_row([str(m), str(cell[0]["spec"]["code_dim"]), str(k)], cell))
    first = results[0]
    ref = next((r for r in results if r["spec"]["num_codebooks"] == m_main), first)
    steps = max(on_schedule(r["curve"])[-1]["step"] for r in results)  # runs stopped early (--stop-delta) end sooner
    budget = (
        f"up to {steps} steps x {first['batch_size']} images per run, Adam lr {cfg['lr']}, fp32, gradient "
        f"clip 2.0; validation on the same {first['val_images']} held-out images"
    )
    md = [
        "# DQ vs VQ (experiments/dq_vs_vq.py)",
        "",
        f"Data: {first['data']}.",
        "",
        f"Budget: {budget}. Net: {ref['parameters']:,} parameters ({ref['spec']['mode']}, M={m_main}), "
        f"{len(results)} runs. Values are mean ± std over seeds (sample std).",
        "",
        "## DQ vs VQ (same codebook memory M*K*D and decoder width M*D)",
        "",
        markdown_table(header, main_rows),
        "",
        "## Initialisation",
        "",
        markdown_table(header, init_rows) if init_rows else "(no runs)",
        "",
        "## Paired differences (same seed), mean ± std over seeds",
        "",
        markdown_table(
            ["difference", "n", "mean ± std", "per seed"],
            [
                [k, d["n"], f"{d['mean']:+.4f} ± {d['std']:.4f}", ", ".join(f"{v:+.4f}" for v in d["per_seed"])]
                for k, d in diffs.items()
            ],
        ),
        "",
        f"## Number of codebooks M at fixed memory (dq, init {main_init}, M*D = {cfg['width']})",
        "",
        markdown_table(["M", "D", "K", *header[2:]], sweep_rows),
        "",
        "B includes the uniform code cost, which grows with M (M log2 K bits per position).",
    ]
    summary = {"config": cfg, "differences": diffs, "runs": results}
    return summary, "\n".join(md)


def band(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float], list[int]]:
    """Mean and sample std of `key` over the runs at each validation step, and how many runs validated there: runs
    stopped early (`--stop-delta`) leave the band at their last validation, the rest carry it on."""
    at: dict[int, list[float]] = {}
    for r in runs:
        for point in on_schedule(r["curve"]):
            at.setdefault(point["step"], []).append(point[key])
    steps = sorted(at)
    stats = [mean_std(at[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats], [len(at[s]) for s in steps]


def plot_curves(results: list[dict[str, Any]], cfg: dict[str, Any], path: Path) -> None:
    """Validation A against steps, mean ± std band over seeds: DQ vs VQ per init, and the M sweep."""
    inits = [cfg["init"]] + sorted({r["spec"]["init"] for r in results} - {cfg["init"]})
    m_main = main_codebooks(cfg["width"])
    panels = [
        (
            f"init {i}: DQ vs VQ (M={m_main})",
            [(mode, dict(mode=mode, init=i, num_codebooks=m_main)) for mode in ("dq", "vq")],
        )
        for i in inits
    ]
    panels.append(
        (
            f"DQ, init {cfg['init']}: M at fixed memory",
            [(f"M={m}", dict(mode="dq", init=cfg["init"], num_codebooks=m)) for m in SWEEP_M],
        )
    )
    fig = Figure(figsize=(5 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for label, sel in lines:
            runs = [r for r in results if all(r["spec"][k] == v for k, v in sel.items())]
            if not runs:
                continue
            steps, mean, std, _ = band(runs, "A")
            ax.plot(steps, mean, marker="o", label=f"{label} (n={len(runs)})")
            low, high = zip(*((m - s, m + s) for m, s in zip(mean, std, strict=True)), strict=True)
            ax.fill_between(steps, low, high, alpha=0.25)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation A, bits/dim (decoder only)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data-root", default=None, help="folder containing cifar-10-batches-py (default: the preset's data/)"
    )
    p.add_argument("--out", required=True, help="output folder (runs/ inside it holds one run directory per run)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main DQ vs VQ comparison")
    p.add_argument("--sweep-seeds", type=int, default=2, help="seeds of the init question and the M sweep")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 250; 4 with --smoke)")
    p.add_argument("--val-points", type=int, default=10, help="validations per run, evenly spaced (the curve's points)")
    p.add_argument(
        "--stop-delta",
        type=float,
        default=None,
        help="stop a run once validation A improves by no more "
        "than this between two validations (default: run all --steps)",
    )
    p.add_argument("--init", choices=["default", "kaiming"], default="kaiming", help="init of the main comparison")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (each in its own process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--smoke", action="store_true", help="tiny net, synthetic 16x16 images, a few steps")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["main", "init", "sweep"],
        default=None,
        help="train only these groups (two invocations with disjoint groups may share --out)",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: summarize the runs of the grid already under --out (missing ones listed)",
    )
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 250)
    for name in ("seeds", "steps", "val_points", "jobs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.sweep_seeds <= args.seeds:
        p.error(f"--sweep-seeds must be in 0..--seeds ({args.seeds}), got {args.sweep_seeds}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    points = min(args.val_points, args.steps)
    every = args.steps // points  # validations every `every` steps, the last at the final step
    width = 8 if args.smoke else 64  # M*D
    batch = int(SMOKE["data.init_args.batch_size"]) if args.smoke else 16
    cfg = dict(
        out=args.out,
        data_root=args.data_root,
        smoke=args.smoke,
        steps=every * points,
        every=every,
        stop_delta=args.stop_delta,
        batch_size=batch,
        threads=args.threads,
        init=args.init,
        width=width,
        lr=1e-3,
    )
    specs = grid(args.seeds, args.sweep_seeds, args.init, width)
    specs = [s for s in specs if not args.only or s.group in args.only]
    print(
        f"[dq_vs_vq] budget: {len(specs)} runs x {cfg['steps']} steps x {batch} images, {args.jobs} at a time with "
        f"{args.threads} thread(s) each; validation every {every} steps",
        flush=True,
    )
    out = Path(args.out)
    if args.summarize_only:  # reads result.json, trains nothing
        specs = [s for s in specs if (out / "runs" / s.name / "result.json").is_file()] or sys.exit(
            f"no finished run under {out / 'runs'}"
        )
    missing = [s.name for s in grid(args.seeds, args.sweep_seeds, args.init, width) if s not in specs]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run is its own `lightning-dq fit` process
        results = list(pool.map(lambda spec: train_one(spec, cfg), specs))
    missing += [s.name for s, r in zip(specs, results, strict=True) if r is None]
    results = [r for r in results if r is not None]
    summary, md = summarize(results, cfg)
    summary["missing"] = missing
    if missing:
        md += f"\n\nNot run (budget): {', '.join(missing)}."
    md += "\n\n![validation curves](dq_vs_vq_curves.png)\n"
    write_outputs(out, "dq_vs_vq", summary, md)
    plot_curves(results, cfg, out / "dq_vs_vq_curves.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()
