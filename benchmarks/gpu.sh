#!/usr/bin/env bash
# One call on a lent CUDA machine (< 8 minutes): the training-step table of benchmarks/train_step.py at batch 128
# (fp32, the default fast path, torch.compile), the quantizer's batched codebooks vs a per-codebook loop, and
# the evaluation paths; printed and written to one file. Never run by tests or CI.
#
#   bash benchmarks/gpu.sh                      # writes benchmarks/gpu-results.md
#   bash benchmarks/gpu.sh /tmp/out/gpu.md      # or any path (e.g. under $OUT of the device tool)
#
# Every part has its own time limit, so one slow part cannot stop the others from being measured.
# Status: written without a GPU (none was lent to the session that wrote it): unrun.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_FILE=${1:-benchmarks/gpu-results.md}
mkdir -p "$(dirname "$OUT_FILE")"

run() {  # run <seconds> <title> <command...>: one section of the report, cut at <seconds>
    local limit=$1 title=$2
    shift 2
    printf '\n## %s\n\n`%s`\n\n' "$title" "$*"
    timeout "$limit" "$@" 2>&1 | grep -v -e '^W[0-9]' -e 'UserWarning' -e '^  warnings.warn'
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || printf '\n(exit status %s%s)\n' "$rc" "$([ "$rc" -eq 124 ] && echo ': time limit reached')"
}

{
    printf '# GPU benchmarks (%s)\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

    run 140 "Training step, README preset, batch 128 (fp32 / channels_last / the default fast path)" \
        $PY benchmarks/train_step.py --device cuda --batch 128 --repeats 5 --resolution 32 64 \
        --variants fp32 fp32-cl default --loader-batches 50

    run 200 "Training step, README preset, batch 128, 32x32: torch.compile (compile time in its own column)" \
        $PY benchmarks/train_step.py --device cuda --batch 128 --repeats 5 --resolution 32 \
        --variants fp32 default compile --loader-batches 0

    run 40 "Quantizer: batched codebooks vs per-codebook loop (M=5, K=512, D=64, fp32)" $PY - <<'EOF'
import statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
from quantizer import D, M, make

print("| N vectors / codebook | batched ms | loop ms | loop / batched |\n| ---: | ---: | ---: | ---: |")
for n in (8192, 512, 128 * 8 * 8):  # the issue's size, the README preset's top and bottom levels at batch 128
    x = torch.randn(M, n, D, device="cuda")
    runs = {}
    for variant in ("batched", "loop"):
        step, codebooks = make(variant)
        runs[variant] = (step, [cb.to("cuda") for cb in codebooks])
    times = {v: [] for v in runs}
    with torch.no_grad():
        for step, state in runs.values():
            step(state, x)  # warm-up
        for _ in range(50):  # interleaved
            for v, (step, state) in runs.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(state, x)
                torch.cuda.synchronize()
                times[v].append(time.perf_counter() - t0)
    med = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    print(f"| {n} | {med['batched']:.3f} | {med['loop']:.3f} | {med['loop'] / med['batched']:.2f}x |")
EOF

    run 60 "Evaluation: two-pass reference vs one-pass (figures A, B, C)" \
        $PY benchmarks/evaluation.py --device cuda --images 1024 --batch 128 --repeats 3
} 2>&1 | tee "$OUT_FILE"
echo "written: $OUT_FILE"
