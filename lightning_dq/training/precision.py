"""One precision per run, for the whole model, from the device unless the config sets one: bf16-mixed only where
bf16 matrix work is faster than fp32 (CUDA sm80+, CPUs with AMX). An AVX512-BF16 CPU without AMX ran bf16 2x slower
than fp32, an AVX2 CPU emulates it 6-50x slower (docs/benchmarks.md): 32-true there."""

from pathlib import Path

import torch


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def fast_bf16(device_type: str) -> bool:
    """Whether bf16 matrix work is faster than fp32 on this kind of device (see the module docstring)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device_type == "cpu" and "amx_bf16" in cpu_flags()


def resolve_precision(precision: str | None, accelerator: str | None) -> tuple[str, str]:
    """The precision a run uses and why: `precision` when the config sets one, else bf16-mixed where bf16 is fast
    on the device `accelerator` selects and 32-true elsewhere."""
    if precision not in (None, "auto"):
        return str(precision), "set in the config"
    gpu = accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available()
    device = "cuda" if gpu else "cpu" if accelerator in (None, "auto", "cpu") else str(accelerator)
    if fast_bf16(device):
        return "bf16-mixed", f"auto: bf16 is fast on this {device}"
    missing = "AMX" if device == "cpu" else "bf16 units"
    return "32-true", f"auto: bf16 would be slower than fp32 on this {device} (no {missing})"
