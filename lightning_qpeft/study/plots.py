"""A study's plots (matplotlib, Agg backend: PNG files, no display needed).

    quality_vs_memory.png      `report.quality` against peak memory, one point a finished cell, the Pareto
                               front (no other cell is both leaner and better) drawn and its points ringed
    quality_vs_throughput.png  the same against perf/tokens_per_s (when no run logs it: the cell's CPU time,
                               else its wall time)
    bar_<metric>.png           one bar a cell, per metric of `report.bars`

Memory is `perf/peak_memory_gib` when the runs log it, else the cell process's `peak_cuda_gib`, else its
`peak_rss_gib`; the axis label says which. With `quality_meaningful: false` the quality plots are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lightning_qpeft.study.collect import better_words, higher_is_better

if TYPE_CHECKING:
    from lightning_qpeft.study.results import StudyResults

MEMORY_SOURCES = {
    "perf/peak_memory_gib": "peak GPU memory, GiB (perf/peak_memory_gib)",
    "peak_cuda_gib": "peak CUDA memory of the cell process, GiB",
    "peak_rss_gib": "peak RSS of the cell process, GiB (CPU memory incl. Python + libraries)",
}
SPEED_SOURCES = {
    "perf/tokens_per_s": "training throughput, tokens/s (perf/tokens_per_s)",
    "cpu_time_s": "CPU time of the cell's process, s (perf/tokens_per_s not logged)",
    "wall_time_s": "wall time of the cell's process, s (perf/tokens_per_s not logged)",
}
EFFICIENCY_BARS = ("perf/peak_memory_gib", "perf/tokens_per_s", "perf/mfu", "adapter/size_bytes",
                   "params/trainable", "peak_rss_gib", "wall_time_s", "cpu_time_s")


def pareto_front(points: list[tuple[float, float]], x_lower: bool = True, y_lower: bool = True) -> list[int]:
    """Indices of the points no other point dominates (as good or better on both axes, better on one)."""
    sx, sy = (1 if x_lower else -1), (1 if y_lower else -1)
    costs = [(sx * x, sy * y) for x, y in points]
    front = []
    for i, (x, y) in enumerate(costs):
        dominated = any(ox <= x and oy <= y and (ox < x or oy < y) for j, (ox, oy) in enumerate(costs) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def first_present(rows: list[dict[str, Any]], sources: dict[str, str]) -> Optional[str]:
    for metric in sources:
        if any(r.get(metric) is not None for r in rows):
            return metric
    return None


def _done(rows: list[dict[str, Any]], *metrics: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "done" and all(r.get(m) is not None for m in metrics)]


def _varying(study: StudyResults) -> list[str]:
    return [a for a in study.spec.axes if len({c.labels[a] for c in study.cells}) > 1]


def _cell_label(study: StudyResults, row: dict[str, Any], skip: Optional[str] = None) -> str:
    varying = _varying(study)
    label = "/".join(str(row[a]) for a in varying if a != skip) or "/".join(str(row[a]) for a in varying)
    return "/".join(filter(None, [label, row.get("extra")])) or row["cell"]


def scatter(study: StudyResults, rows: list[dict[str, Any]], x: str, x_label: str, y: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _done(rows, x, y)
    if not pts:
        return False
    row_axis = study.spec.row_axis
    groups = list(dict.fromkeys(r[row_axis] for r in pts))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    cmap = plt.get_cmap("tab10")
    for k, g in enumerate(groups):
        sel = [r for r in pts if r[row_axis] == g]
        ax.scatter([r[x] for r in sel], [r[y] for r in sel], color=cmap(k % 10), label=f"{g}", s=28, zorder=3)
    for r in pts:
        ax.annotate(_cell_label(study, r, skip=row_axis), (r[x], r[y]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points", color="0.3")
    x_higher, y_higher = higher_is_better(x, study.directions), higher_is_better(y, study.directions)
    if x_higher is not None and y_higher is not None:  # a front needs both directions
        front = pareto_front([(r[x], r[y]) for r in pts], x_lower=not x_higher, y_lower=not y_higher)
        fx, fy = [pts[i][x] for i in front], [pts[i][y] for i in front]
        ax.step(fx, fy, where="post", color="0.5", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="k", lw=1, zorder=4)
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(f"{y} ({better_words(y_higher)})", fontsize=8)
    ax.set_title(f"{study.spec.name}: {y} vs {x}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, title=row_axis, title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def bar_chart(study: StudyResults, rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _done(rows, metric)
    if not pts:
        return False
    row_axis = study.spec.row_axis
    groups = list(dict.fromkeys(r[row_axis] for r in pts))
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(pts) + 1.5), 3.6), dpi=90)
    ax.bar(range(len(pts)), [r[metric] for r in pts],
           color=[cmap(groups.index(r[row_axis]) % 10) for r in pts])
    ax.set_xticks(range(len(pts)), [_cell_label(study, r) for r in pts], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(metric, fontsize=8)
    ax.set_title(f"{study.spec.name}: {metric} ({better_words(higher_is_better(metric, study.directions))})",
                 fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_plots(study: StudyResults, rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Write every plot the results allow; the list of files written (stale PNGs are removed first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    spec, written = study.spec, []
    quality = spec.report.quality
    if spec.quality_meaningful:
        mem = first_present(_done(rows), MEMORY_SOURCES)
        if mem and scatter(study, rows, mem, MEMORY_SOURCES[mem], quality, out_dir / "quality_vs_memory.png"):
            written.append(out_dir / "quality_vs_memory.png")
        speed = first_present(_done(rows), SPEED_SOURCES)
        if speed and scatter(study, rows, speed, SPEED_SOURCES[speed], quality, out_dir / "quality_vs_throughput.png"):
            written.append(out_dir / "quality_vs_throughput.png")
    bars = spec.report.bars if spec.report.bars is not None else list(
        dict.fromkeys([*spec.report.metrics, *EFFICIENCY_BARS]))
    for metric in bars:
        if not spec.quality_meaningful and metric == quality:
            continue
        path = out_dir / f"bar_{metric.replace('/', '_')}.png"
        if bar_chart(study, rows, metric, path):
            written.append(path)
    return [str(p) for p in written]
