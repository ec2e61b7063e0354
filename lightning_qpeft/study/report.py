"""A study's outputs: results.csv, report.md (tables grouped like QLoRA's Table 4), plots, README section.

Config keys (`report.*` of the study config, see `ReportSpec`): rows, columns, metrics, quality, baseline,
bars, readme_plots; and the study's `quality_meaningful` and `note`.

- results.csv: one row a cell (also cells not yet run), every metric a column (full precision, so the
  numbers are the TensorBoard logs' own); written atomically after every cell.
- report.md: per metric a table, rows = the `rows` axis' labels, columns = combinations of the `columns`
  axes' labels; cells that differ only in other axes (seeds) are averaged (mean ± std, n). The best value of
  each column is bold. A cell that did not finish shows its status. Then the comparison with `baseline`,
  every cell's numbers, the failures with their errors, and the plots.
- `--readme FILE`: the tables, the comparison and the `readme_plots` go between
  `<!-- study:NAME:begin -->` and `<!-- study:NAME:end -->` of FILE; the PNGs are copied beside it.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import statistics
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lightning_qpeft.study.collect import (
    KNOWN_METRICS,
    QUALITY_METRICS,
    RUNNER_METRICS,
    better_words,
    higher_is_better,
)
from lightning_qpeft.study.plots import write_plots
from lightning_qpeft.utils.atomic import atomic_file

if TYPE_CHECKING:
    from lightning_qpeft.study.results import StudyResults


# ---------------------------------------------------------------------------------------------- rows
def result_rows(study: StudyResults) -> list[dict[str, Any]]:
    """One flat dict per cell of the grid: labels, status, error, metrics (missing: absent)."""
    rows = []
    for cell in study.cells:
        res = study.result(cell)
        row: dict[str, Any] = {"cell": cell.id, **cell.labels, "extra": cell.extra}
        if res is None:
            row["status"] = "not run"
        else:
            row.update(status=res["status"], error=res["error"], config=res["config"], **res["metrics"])
        rows.append(row)
    return rows


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed metrics in their order, then any other `section/name` tag some cell logged."""
    seen = {k for r in rows for k in r if "/" in k and k not in KNOWN_METRICS}
    return [*RUNNER_METRICS, *KNOWN_METRICS, *sorted(seen)]


def csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    return str(v)


def write_csv(path: Path, study: StudyResults, rows: list[dict[str, Any]]) -> None:
    axes = list(study.spec.axes)
    extra = ["extra"] if any(r.get("extra") for r in rows) else []
    columns = ["cell", *axes, *extra, "status", "error", *metric_columns(rows), "config"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: csv_value(r.get(c)) for c in columns})
    with atomic_file(path, "w") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------------------------------------- formatting
def fmt(metric: str, v: float) -> str:
    if metric.endswith("size_bytes"):
        return f"{v / 2**20:.2f} MiB" if v >= 2**20 else f"{v / 2**10:.0f} KiB"
    if metric.startswith("params/"):
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _agg(metric: str, values: list[float]) -> str:
    if len(values) == 1:
        return fmt(metric, values[0])
    return f"{fmt(metric, statistics.mean(values))} ± {fmt(metric, statistics.stdev(values))} (n={len(values)})"


def _status_word(group: list[dict[str, Any]]) -> str:
    statuses = sorted({r["status"] for r in group})
    return "/".join(s if s != "done" else "n/a" for s in statuses)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def pivot_table(study: StudyResults, rows: list[dict[str, Any]], metric: str) -> str:
    """QLoRA-Table-4-style table of one metric: rows axis down, column axes across."""
    spec = study.spec
    row_axis, col_axes = spec.row_axis, spec.column_axes
    if any(r.get("extra") for r in rows):  # `include` cells with extra keys get columns of their own
        col_axes = [*col_axes, "extra"]
    labels = {a: [lab for lab in _axis_labels(study, a) if any(r.get(a) == lab for r in rows)] for a in spec.axes}
    labels["extra"] = list(dict.fromkeys(r.get("extra", "") for r in rows))
    combos = [c for c in product(*(labels[a] for a in col_axes))
              if any(all(r.get(a) == lab for a, lab in zip(col_axes, c)) for r in rows)] or [()]
    higher = higher_is_better(metric, study.directions)
    better = None if higher is None else max if higher else min
    table: list[list[str]] = []
    means: dict[tuple[int, int], float] = {}
    for i, rlab in enumerate(labels[row_axis]):
        line = [rlab]
        for j, combo in enumerate(combos):
            group = [r for r in rows if r.get(row_axis) == rlab and all(r.get(a) == lab for a, lab in zip(col_axes, combo))]
            values = [r[metric] for r in group if r["status"] == "done" and r.get(metric) is not None]
            if not group:
                line.append("")
            elif values:
                means[i, j] = statistics.mean(values)
                text = _agg(metric, values)
                missing = len(group) - len(values)
                line.append(text + (f" ({missing} not done)" if missing else ""))
            else:
                line.append(_status_word(group))
        table.append(line)
    for j in range(len(combos)):  # bold the best of each column
        col = {i: v for (i, jj), v in means.items() if jj == j}
        if len(col) > 1 and better is not None:
            best = better(col.values())
            for i, v in col.items():
                if v == best:
                    table[i][j + 1] = f"**{table[i][j + 1]}**"
    header = [row_axis] + [" / ".join(filter(None, c)) if c else metric for c in combos]
    return _md_table(header, table)


def _table_or_absence(study: StudyResults, rows: list[dict[str, Any]], metric: str) -> str:
    if any(r["status"] == "done" and r.get(metric) is not None for r in rows):
        return pivot_table(study, rows, metric)
    return f"No finished cell logged `{metric}` (its runs do not compute it)."


def _axis_labels(study: StudyResults, axis: str) -> list[str]:
    out: list[str] = []
    for c in study.cells:
        if c.labels[axis] not in out:
            out.append(c.labels[axis])
    return out


def baseline_lines(study: StudyResults, rows: list[dict[str, Any]], metric: str) -> list[str]:
    """How each row label compares with the baseline label on `metric`: the relative difference of cells equal
    in every other axis, averaged, then per column of the table."""
    spec = study.spec
    base, axis = spec.report.baseline, spec.row_axis
    if base is None:
        return []
    others = [a for a in spec.axes if a != axis]
    columns = [a for a in spec.column_axes if a != axis]

    def key(r: dict[str, Any]) -> tuple:
        return tuple(r.get(a) for a in others) + (r.get("extra"),)

    done = [r for r in rows if r["status"] == "done" and r.get(metric) is not None]
    base_by_key = {key(r): r[metric] for r in done if r.get(axis) == base}
    out = []
    for lab in _axis_labels(study, axis):
        if lab == base:
            continue
        pairs = [(r, 100 * (r[metric] - base_by_key[key(r)]) / abs(base_by_key[key(r)])) for r in done
                 if r.get(axis) == lab and key(r) in base_by_key and base_by_key[key(r)] != 0]
        if not pairs:
            out.append(f"- {lab}: no finished cell to compare with {base}")
            continue
        by_column: dict[str, list[float]] = {}
        for r, rel in pairs:
            name = " / ".join(filter(None, [*(str(r.get(a)) for a in columns), r.get("extra")]))
            by_column.setdefault(name, []).append(rel)
        detail = ", ".join(f"{name} {_pct(statistics.mean(v))}" for name, v in by_column.items() if name)
        out.append(f"- {lab}: {metric} {_pct(statistics.mean(rel for _, rel in pairs))} vs {base} on average over "
                   f"{len(pairs)} paired cell(s)" + (f"; {detail}" if detail else ""))
    return out


def _pct(value: float) -> str:
    return f"{value:+.1f} %" if round(value, 1) != 0 else "+0.0 %"  # never "-0.0 %"


def summary_line(rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "refused", "not run")}
    return f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def caveats(study: StudyResults) -> list[str]:
    spec, out = study.spec, []
    if spec.note:
        out.append(f"> {spec.note.strip()}")
    if not spec.quality_meaningful:
        out.append("> **Quality columns are not meaningful here** (" + ", ".join(QUALITY_METRICS[:3]) +
                   ", ...): the weights are random; read this study for memory, speed and size only.")
    return out


def _failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [f"- `{r['cell']}` ({r['status']}): {r['error'].splitlines()[0] if r['error'] else ''}"
            for r in rows if r["status"] in ("failed", "refused")]


def markdown_report(study: StudyResults, rows: list[dict[str, Any]], plot_files: list[str]) -> str:
    spec = study.spec
    notes = caveats(study)
    parts = [f"# Study: {spec.name}", "", *notes, *([""] if notes else []),
             f"{summary_line(rows)}. Base config `{spec.base_config}`; axes: "
             + "; ".join(f"`{a}` ({', '.join(_axis_labels(study, a))})" for a in spec.axes) + ".", ""]
    for metric in spec.report.metrics:
        direction = better_words(higher_is_better(metric, study.directions))
        meaningless = not spec.quality_meaningful and metric in QUALITY_METRICS
        parts += [f"## {metric} ({direction}{'; not meaningful: random weights' if meaningless else ''})", "",
                  _table_or_absence(study, rows, metric), ""]
    lines = baseline_lines(study, rows, spec.report.quality)
    if lines:
        parts += [f"## Compared with {spec.report.baseline}", "", *lines, ""]
    present = [m for m in metric_columns(rows) if any(r.get(m) is not None for r in rows)]
    parts += ["## Every cell", "", _md_table(
        ["cell", "status", *present],
        [[r["cell"], r["status"], *(fmt(m, r[m]) if r.get(m) is not None else "" for m in present)] for r in rows]), ""]
    failures = _failure_lines(rows)
    if failures:
        parts += ["## Failed and refused cells", "", *failures, ""]
    if plot_files:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plot_files] + [""]
    parts += ["n/a: the cell finished without logging the metric. Peak memory: `perf/peak_memory_gib` where the runs log it (GPU); `peak_cuda_gib`: the cell process's "
              "torch.cuda.max_memory_allocated; `peak_rss_gib`: the cell process's peak resident memory "
              "(ru_maxrss of os.wait4: CPU memory of the whole process, Python and libraries included). "
              "`wall_time_s`: the cell's process from start to exit (imports, loading, fit, evaluation); `cpu_time_s`: "
              "its user + system CPU time (less sensitive to other load on the machine).", ""]
    return "\n".join(parts)


def write_reports(study: StudyResults, plots: bool = True) -> list[dict[str, Any]]:
    """results.csv and report.md (and, with `plots`, the PNGs) from the cells' result.json files."""
    rows = result_rows(study)
    out = study.out
    write_csv(out / "results.csv", study, rows)
    plot_files = write_plots(study, rows, out / "plots") if plots else sorted(
        str(p) for p in (out / "plots").glob("*.png"))
    with atomic_file(out / "report.md", "w") as f:
        f.write(markdown_report(study, rows, plot_files))
    return rows


# ---------------------------------------------------------------------------------------------- README
def readme_section(study: StudyResults, rows: list[dict[str, Any]], assets_rel: str) -> str:
    spec = study.spec
    parts = [*caveats(study), f"{summary_line(rows)}.", ""]
    for metric in spec.report.metrics:
        parts += [f"{metric} ({better_words(higher_is_better(metric, study.directions))}):", "",
                  _table_or_absence(study, rows, metric), ""]
    lines = baseline_lines(study, rows, spec.report.quality)
    if lines:
        parts += [f"Compared with {spec.report.baseline}:", "", *lines, ""]
    failures = _failure_lines(rows)
    if failures:
        parts += ["Failed and refused cells:", "", *failures, ""]
    for stem in spec.report.readme_plots:
        parts += [f"![{stem}]({assets_rel}/{stem}.png)", ""]
    return "\n".join(parts).rstrip() + "\n"


def update_readme(study: StudyResults, readme: str, assets_dir: Optional[str] = None) -> Path:
    """Put the study's tables and plots between the README's markers; copy the plots beside it."""
    path = Path(readme)
    begin, end = f"<!-- study:{study.spec.name}:begin -->", f"<!-- study:{study.spec.name}:end -->"
    text = path.read_text()
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise ValueError(f"readme: {readme} has no section marked {begin} ... {end}; add the two lines where the "
                         "study's tables should go")
    assets = Path(assets_dir) if assets_dir else path.parent / "docs" / "study" / study.spec.name
    for stem in study.spec.report.readme_plots:
        src = study.out / "plots" / f"{stem}.png"
        if not src.exists():
            raise FileNotFoundError(f"report.readme_plots: {src} was not written (run the study first)")
        assets.mkdir(parents=True, exist_ok=True)
        with atomic_file(assets / src.name, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
    rel = Path(os.path.relpath(assets, path.parent)).as_posix()
    section = readme_section(study, result_rows(study), rel)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with atomic_file(path, "w") as f:
        f.write(f"{head}{begin}\n{section}{end}{tail}")
    return path
