"""Where a CUDA allocation history peaks, and what was live there: the set-up peak's culprits, as text.

    python3 benchmarks/memory_peak.py RUN-setup_memory_rank0.pickle [--top 12]

Reads a snapshot written by `torch.cuda.memory._snapshot()` with the history on (the efficiency callback's
`record_setup_memory: true`), replays its allocation trace (alloc adds, free_completed removes) to find the
moment most bytes were allocated, and prints the allocations live then, grouped by where they were made (the
innermost frames of the packages named in FRAMES). memory_viz (https://pytorch.org/memory_viz) draws the same
trace; this prints it on a machine without a browser, for RESULTS.md. Blocks allocated before the history
started are not in the trace (the callback starts it before the model is loaded, so there are none).
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict
from typing import Any

GIB = 2**30
# the frames that say which step of the set-up made a block (torch's own internals would only say "empty")
FRAMES = ("lightning_qpeft", "transformers", "peft", "bitsandbytes", "torch/distributed", "lightning/")


def site(frames: list[dict[str, Any]], depth: int = 3) -> str:
    """The innermost `depth` frames of FRAMES' packages, innermost first."""
    kept = [f for f in frames if any(p in f.get("filename", "") for p in FRAMES)]
    return " < ".join(f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']} {f['name']}"
                      for f in kept[:depth]) or "(no frame of " + ", ".join(FRAMES) + ")"


def replay(trace: list[dict[str, Any]]) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """(peak bytes, index of the event that reached it, the blocks live then: address -> alloc event)."""
    live: dict[int, int] = {}
    now = peak = peak_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            now += e["size"]
            if now > peak:
                peak, peak_at = now, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])
    # a second pass up to the peak keeps the blocks live there (copying them at every new peak is quadratic)
    at_peak: dict[int, dict[str, Any]] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            at_peak[e["addr"]] = e
        elif e["action"] == "free_completed":
            at_peak.pop(e["addr"], None)
    return peak, peak_at, at_peak


def freed_by(trace: list[dict[str, Any]], peak_at: int, live: dict[int, dict[str, Any]]) -> dict[int, str]:
    """address -> where the first free of each block live at the peak was requested, after the peak (the
    Python frame that dropped the last reference tells who held it), or "not freed" by the end of the trace."""
    out = {addr: "not freed before the trace ends" for addr in live}
    pending = set(live)
    for e in trace[peak_at + 1:]:
        if e["action"] == "free_requested" and e["addr"] in pending:
            out[e["addr"]] = site(e.get("frames", []), depth=2)
            pending.discard(e["addr"])
    return out


def report(snapshot: dict[str, Any], top: int = 12, device: int = 0) -> str:
    traces = snapshot.get("device_traces") or []
    if device >= len(traces) or not traces[device]:
        return f"no allocation trace for device {device} (was the history recorded?)"
    trace = traces[device]
    peak, peak_at, live = replay(trace)
    released = freed_by(trace, peak_at, live)
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for addr, e in live.items():
        g = groups[site(e.get("frames", [])), released[addr]]
        g[0] += e["size"]
        g[1] += 1
    lines = [f"{len(trace)} events; peak {peak / GIB:.2f} GiB allocated at event {peak_at}; live then, by site "
             "(and where they were freed later):"]
    for (where, freed), (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {size / GIB:7.2f} GiB  {n:6d} blocks  {where}\n{'':28}freed: {freed}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    for path in a.snapshot:
        with open(path, "rb") as f:
            print(f"== {path}\n{report(pickle.load(f), a.top)}")


if __name__ == "__main__":
    main()
