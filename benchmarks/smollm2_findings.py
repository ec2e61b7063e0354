"""The SmolLM2 study's findings, from its results.csv: per task, quality against cost; NF4 against bf16, paired.

    python benchmarks/smollm2_findings.py [docs/study/smollm2/results.csv]

Prints Markdown: for each task, every (adapter, base) with finished cells as mean ± std over seeds, beside peak
memory, trainable parameters and adapter size; then the paired comparison of NF4 + DQ with bf16: cells that
differ only in the base (same task, adapter and seed), the mean difference and an exact two-sided sign-flip
permutation test (under the null hypothesis that NF4 and bf16 are exchangeable, each pair's difference is as
likely negative as positive; all 2^n sign assignments are enumerated). Cells that failed for want of GPU memory
(several cells shared one GPU) are left out and counted.
"""

from __future__ import annotations

import csv
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY = {"samsum": ["test/rougeL", "test/bleu"], "e2e": ["test/bleu", "test/rougeL"],
           "alpaca": ["mmlu0/accuracy", "mmlu5/accuracy", "test/rougeL"]}
COST = ["perf/peak_memory_gib", "params/trainable", "adapter/size_bytes", "test/stopped_fraction"]


def _num(row: dict, key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, ValueError, TypeError):
        return None


def _fmt(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided p of the mean paired difference under random signs."""
    observed = abs(sum(diffs))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def main(path: str) -> None:
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    done = [r for r in rows if r["status"] == "done"]
    oom = [r for r in rows if r["status"] == "failed" and "out of memory" in r.get("error", "")]
    other = [r for r in rows if r["status"] == "failed" and r not in oom]
    print(f"{len(done)} cells done, {len(oom)} failed for want of GPU memory (cells sharing the GPU), "
          f"{len(other)} failed otherwise, {sum(r['status'] == 'not run' for r in rows)} not run.\n")
    for task, metrics in QUALITY.items():
        cells = [r for r in done if r["task"] == task]
        if not cells:
            continue
        scale = {m: (100.0 if m.startswith("mmlu") or m.endswith("stopped_fraction") else 1.0)
                 for m in metrics + COST}
        print(f"### {task}\n")
        print("| adapter | base | " + " | ".join(metrics) + " | stopped % | peak GiB | trainable | adapter MiB |")
        print("|---|---|" + "---|" * (len(metrics) + 4))
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in cells:
            groups.setdefault((r["model.adapter"], r["quantization"]), []).append(r)
        for (adapter, base), group in groups.items():
            quality = [_fmt([_num(r, m) for r in group], scale[m]) for m in metrics]
            stopped = _fmt([_num(r, "test/stopped_fraction") for r in group], 100.0)
            memory = _fmt([_num(r, "perf/peak_memory_gib") for r in group][:1])
            trainable = _num(group[0], "params/trainable")
            size = _num(group[0], "adapter/size_bytes")
            print(f"| {adapter} | {base} | " + " | ".join(quality) + f" | {stopped} | {memory} | "
                  f"{'' if trainable is None else f'{trainable / 1e6:.2f} M'} | "
                  f"{'' if size is None else f'{size / 2**20:.1f}'} |")
        print()
    print("### NF4 + DQ against bf16, paired (same task, adapter and seed)\n")
    print("| metric | pairs | mean NF4 - bf16 | NF4 lower in | sign-flip p (two-sided) |")
    print("|---|---|---|---|---|")
    by_key = {(r["task"], r["model.adapter"], r["seed_everything"], r["quantization"]): r for r in done}
    for metric in ("test/rougeL", "test/bleu", "mmlu5/accuracy"):
        diffs = []
        for (task, adapter, seed, base), r in by_key.items():
            if base != "bf16" or (task, adapter, seed, "nf4-dq") not in by_key:
                continue
            a, b = _num(by_key[(task, adapter, seed, "nf4-dq")], metric), _num(r, metric)
            if a is not None and b is not None:
                diffs.append(a - b)
        if diffs:
            scale = 100.0 if metric.startswith("mmlu") else 1.0
            print(f"| {metric} | {len(diffs)} | {scale * statistics.mean(diffs):+.2f} | "
                  f"{sum(d < 0 for d in diffs)} of {len(diffs)} | {sign_flip_p(diffs):.4f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "study" / "smollm2" / "results.csv"))
