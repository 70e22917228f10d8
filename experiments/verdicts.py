"""The paper's DQ-vs-VQ claims per training budget: paired differences by seed, a verdict by a stated rule, and where
along the validation curve the difference changes sign. Reads what experiments/dq_vs_vq.py wrote (each run's
`result.json`: final and per-validation A and MSE on the same held-out images); trains nothing.

    .venv/bin/python experiments/verdicts.py --budget runs/exp/b2500 --budget runs/exp/b10000:result_stopped.json \
        --budget runs/exp/b10000 --out runs/exp/verdicts

Rule (a claim is "DQ lower than VQ" for val A and val MSE): with the per-seed differences d = DQ - VQ (same seed,
same data order) and their two-sided 95% Student-t interval, the claim **holds** when the whole interval is below 0,
**does not hold** when it is above 0, and is **inconclusive** when it contains 0 (or fewer than 2 seeds finished).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, mean_std, on_schedule, write_outputs  # noqa: E402

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def verdict(diffs: list[float]) -> dict[str, Any]:
    """Mean, sample std and 95% t-interval of the paired differences `diffs`, and the verdict of the rule above."""
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs[0] if diffs else math.nan, "verdict": "inconclusive (fewer than 2 seeds)"}
    mean, std = mean_std(diffs)
    half = T975.get(n - 1, 1.96) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    word = "holds" if high < 0 else "does not hold" if low > 0 else "inconclusive"
    worse = sum(d > 0 for d in diffs)
    return {"n": n, "mean": mean, "std": std, "ci95": [low, high], "dq_worse_in": worse, "verdict": word}


def sign_changes(curves: dict[int, tuple[list[dict], list[dict]]], key: str) -> tuple[list[tuple[int, float]], list]:
    """The mean paired difference at each validation step (over the seeds validated at that step in both modes) and
    the steps where its sign flips (the first step of the new sign)."""
    paired: dict[int, list[float]] = {}
    for dq, vq in curves.values():
        b = {p["step"]: p[key] for p in vq}
        for point in dq:
            if point["step"] in b:
                paired.setdefault(point["step"], []).append(point[key] - b[point["step"]])
    mean_curve = [(step, sum(d) / len(d)) for step, d in sorted(paired.items())]
    flips = [s1 for (_, d0), (s1, d1) in itertools.pairwise(mean_curve) if (d0 < 0) != (d1 < 0)]
    return mean_curve, flips


CLAIMS = {
    "A": "val A: DQ < VQ (last validation)",
    "A_best": "val A: DQ < VQ (best validation)",
    "A_matched": "val A: DQ < VQ (last step both validated)",
    "mse": "val MSE: DQ < VQ (last validation)",
}


def compared_values(dq: dict[str, Any], vq: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(DQ, VQ) values of one seed per claim in CLAIMS. Runs stopped early (--stop-delta) end at different steps and
    their last validation may sit on a bump, so A is also compared at its best and at the last common step."""
    common = max({p["step"] for p in dq["curve"]} & {p["step"] for p in vq["curve"]})

    def at(result: dict[str, Any], step: int) -> float:
        return next(p["A"] for p in result["curve"] if p["step"] == step)

    return {
        "A": (dq["A"], vq["A"]),
        "A_best": (min(p["A"] for p in dq["curve"]), min(p["A"] for p in vq["curve"])),
        "A_matched": (at(dq, common), at(vq, common)),
        "mse": (dq["mse"], vq["mse"]),
    }


def budget_report(budget: str) -> dict[str, Any]:
    """Verdicts of one dq_vs_vq.py output folder (one budget), `FOLDER` or `FOLDER:FILE` to read each run's FILE
    instead of its result.json (the stop-rule results kept as result_stopped.json when the runs were continued)."""
    folder_name, _, file_name = budget.partition(":")
    folder, file_name = Path(folder_name), file_name or "result.json"
    results = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob(f"*/{file_name}"))]
    if not results:
        raise SystemExit(
            f"{folder}/runs/*/{file_name}: no such files; train the budget first (experiments/dq_vs_vq.py)"
        )
    for r in results:
        r["curve"] = on_schedule(r["curve"])
        r["steps"] = r["curve"][-1]["step"]  # the last validation is the run's last step
    main = [r for r in results if r["spec"]["num_codebooks"] == 4]
    by_mode = {mode: {r["spec"]["seed"]: r for r in main if r["spec"]["mode"] == mode} for mode in ("dq", "vq")}
    seeds = sorted(set(by_mode["dq"]) & set(by_mode["vq"]))
    report: dict[str, Any] = {
        "folder": str(folder),
        "label": folder.name if file_name == "result.json" else f"{folder.name}:{file_name}",
        "seeds": seeds,
        "steps": max((r["steps"] for r in main), default=0),
    }
    report["wall_seconds"] = sum(r["wall_seconds"] for r in results)
    # runs stopped by --stop-delta end at different steps: each run's last validation, named in the report
    report["stopped_at"] = {s: [by_mode["dq"][s]["steps"], by_mode["vq"][s]["steps"]] for s in seeds}
    curves = {s: (by_mode["dq"][s]["curve"], by_mode["vq"][s]["curve"]) for s in seeds}
    pairs = {s: compared_values(by_mode["dq"][s], by_mode["vq"][s]) for s in seeds}
    along = {metric: sign_changes(curves, metric) for metric in ("A", "mse")}  # the three A claims share one curve
    for key in CLAIMS:
        diffs = [dq - vq for dq, vq in (pairs[s][key] for s in seeds)]
        mean_curve, flips = along["mse" if key == "mse" else "A"]
        report[key] = verdict(diffs) | {"per_seed": diffs, "mean_curve": mean_curve, "sign_changes_at": flips}
    sweep: dict[int, dict[int, float]] = {}  # M -> seed -> A, compared over the seeds every M finished
    for r in results:
        if r["spec"]["mode"] == "dq":
            sweep.setdefault(r["spec"]["num_codebooks"], {})[r["spec"]["seed"]] = r["A"]
    common = set.intersection(*(set(v) for v in sweep.values())) if sweep else set()
    report["sweep_A"] = {m: (*mean_std([v[s] for s in sorted(common)]), len(common)) for m, v in sorted(sweep.items())}
    if 1 in sweep and len(common) >= 2:  # "more codebooks help": A(M) - A(M=1) by seed, the same rule
        report["sweep_vs_M1"] = {
            m: verdict([v[s] - sweep[1][s] for s in sorted(common)]) for m, v in sweep.items() if m > 1
        }
    return report


def markdown(reports: list[dict[str, Any]]) -> str:
    rows = []
    for r in reports:
        for key, claim in CLAIMS.items():
            v = r[key]
            ci = f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if "ci95" in v else "-"
            per_seed = ", ".join(f"{d:+.4f}" for d in v["per_seed"])
            flips = ", ".join(str(s) for s in v["sign_changes_at"]) or "none"
            rows.append(
                [
                    f"{r['label']} ({r['steps']})",
                    claim,
                    v["n"],
                    f"{v['mean']:+.4f} ± {v.get('std', 0):.4f}",
                    ci,
                    per_seed,
                    flips,
                    f"**{v['verdict']}**",
                ]
            )
    header = [
        "budget (most steps)",
        "claim",
        "seeds",
        "DQ - VQ mean ± std",
        "95% interval",
        "per seed",
        "sign flips at step",
        "verdict",
    ]
    lines = [markdown_table(header, rows), ""]
    for r in reports:
        stops = "; ".join(f"seed {s}: DQ {dq}, VQ {vq}" for s, (dq, vq) in r["stopped_at"].items())
        lines.append(f"- {r['label']}, last validation at step: {stops}")
    for r in reports:
        if not r["sweep_A"] or not next(iter(r["sweep_A"].values()))[2]:
            continue
        cells = [f"M={m}: {mean:.3f} ± {std:.3f} (n={n})" for m, (mean, std, n) in r["sweep_A"].items()]
        lines.append(f"- {r['steps']} steps, DQ val A by M at fixed memory: " + "; ".join(cells))
        for m, v in r.get("sweep_vs_M1", {}).items():
            ci = f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
            lines.append(
                f"  - A(M={m}) - A(M=1), by seed: {v['mean']:+.3f} ± {v['std']:.3f}, 95% {ci}: **{v['verdict']}**"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--budget", action="append", required=True, help="an output folder of experiments/dq_vs_vq.py, or FOLDER:FILE"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    reports = [budget_report(budget) for budget in args.budget]
    text = markdown(reports)
    write_outputs(Path(args.out), "verdicts", {"budgets": reports}, "# DQ vs VQ verdicts per budget\n\n" + text)
    print(text)
    return reports


if __name__ == "__main__":
    main()
