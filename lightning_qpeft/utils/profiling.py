"""Where a training step's time goes: a torch.profiler trace of a few steps, summarised by kernel category.

Config key: `efficiency.profile_steps` (the efficiency callback profiles that many optimizer steps right after
its warm-up, before it starts measuring, and writes `<log_dir>/profile.txt`; the summary also goes to perf.json).

The summary splits the GPU's busy time into categories read off the kernel names (matmuls, bitsandbytes'
4-bit dequantization, attention, the optimizer, Triton kernels from liger-kernel or torch.compile, other
element-wise work), and compares it with the wall time of the profiled steps: the difference is time the GPU
waited for the CPU (Python, kernel launches, data), which no kernel speed-up removes.
"""

from __future__ import annotations

from typing import Any

import torch

# first matching pattern wins (kernel names lower-cased)
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("4-bit dequantize", ("dequantize", "kdequant")),
    ("optimizer", ("optimizer", "adam", "multi_tensor", "foreach")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_", "sm80_")),
    ("triton (liger / compile)", ("triton",)),
    ("communication", ("nccl",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
]


def category(kernel: str) -> str:
    name = kernel.lower()
    for label, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return label
    return "element-wise and other"


def is_annotation(name: str) -> bool:
    """A record_function range shown on the device timeline (e.g. `Optimizer.step#PagedAdamW32bit.step`), not a
    kernel: it spans the kernels inside it (under Lightning the whole forward and backward run inside the
    optimizer's step closure), so counting it would count their time twice and hide the GPU's idle time
    (docs/decisions/006-profiler-annotations.md)."""
    return "#" in name or name.startswith(("ProfilerStep", "Optimizer.", "FullyShardedDataParallel."))


def kernel_times(prof: Any) -> dict[str, float]:
    """Self device time (s) of every device kernel in a finished torch.profiler.profile, by kernel name."""
    times: dict[str, float] = {}
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or is_annotation(e.key):
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        times[e.key] = times.get(e.key, 0.0) + us / 1e6
    return times


def summarise(times: dict[str, float], wall_s: float, steps: int, top: int = 25) -> tuple[dict[str, Any], str]:
    """(summary for perf.json, text for profile.txt) of kernel times over `steps` profiled steps."""
    busy = sum(times.values())
    by_category: dict[str, float] = {}
    for name, t in times.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + t
    summary = {
        "steps": steps,
        "wall_s_per_step": wall_s / max(steps, 1),
        "gpu_busy_s_per_step": busy / max(steps, 1),
        "gpu_idle_fraction": max(0.0, 1.0 - busy / wall_s) if wall_s > 0 else None,
        "categories_s_per_step": {k: v / max(steps, 1) for k, v in sorted(by_category.items(), key=lambda x: -x[1])},
    }
    lines = [f"profile of {steps} optimizer step(s): wall {summary['wall_s_per_step'] * 1e3:.1f} ms/step, GPU busy "
             f"{summary['gpu_busy_s_per_step'] * 1e3:.1f} ms/step "
             f"(idle {100 * (summary['gpu_idle_fraction'] or 0):.1f} %: waiting for the CPU)", "",
             f"{'category':<28} {'ms/step':>9} {'% of busy':>9}"]
    for k, v in summary["categories_s_per_step"].items():
        lines.append(f"{k:<28} {v * 1e3:>9.2f} {100 * v * steps / max(busy, 1e-12):>8.1f}%")
    lines += ["", f"top {top} kernels by device time", f"{'ms/step':>9}  {'category':<26} kernel"]
    for name, t in sorted(times.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"{t / max(steps, 1) * 1e3:>9.2f}  {category(name):<26} {name[:110]}")
    return summary, "\n".join(lines) + "\n"


class StepProfiler:
    """torch.profiler over a span of steps; CUDA kernels only matter, so CPU ops are recorded without shapes."""

    def __init__(self, device: torch.device) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.__enter__()

    def stop(self, wall_s: float, steps: int) -> tuple[dict[str, Any], str]:
        self.prof.__exit__(None, None, None)
        return summarise(kernel_times(self.prof), wall_s, steps)
