"""The study spec (a YAML file) and its grid: which cells exist, what each one overrides, and its stable id.

Study config keys (`configs/study/*.yaml`; `python -m lightning_qpeft study --help` lists them all):
    name:         the study's name (default: the config file's stem); outputs go to `studies/<name>/`
    base_config:  the run config every cell starts from (e.g. configs/tiny.yaml)
    axes:         config key -> list of values (`model.quantization: [none, nf4]`), or key -> {label: value}
                  (`model.adapter: {lora: configs/adapter/lora.yaml, ...}`), or a named axis whose labels
                  each set several keys (`quantization: {bf16: {model.quantization: none, model.dtype: bfloat16}}`)
    args:         extra command-line arguments of every cell (`[--trainer.max_steps, "150"]`)
    cell_args:    extra arguments of the cells that match `when` ({axis: label or [labels]}); `fit: false`
                  makes them evaluate without training (a base model zero-shot)
    exclude:      cells to leave out ({axis: label or [labels]} each); include: extra cells ({axis: label, ...,
                  other.key: value})
    evaluate:     what runs after fit in the cell's process: `test` (test/loss, ROUGE/BLEU) and/or `validate`
    report:       how results are tabulated and plotted (`ReportSpec`)
    quality_meaningful, note: printed at the top of the report (e.g. random weights: quality is noise)

The grid is the cartesian product of the axes in the order written, minus `exclude`, plus `include`. A cell's
id is its labels joined by `__`, then a hash of everything it passes to the run (base config path, arguments,
evaluations): change any of them and it is a new cell, never a stale result under an old name. What those
arguments point to - the base config's text, the files it and the arguments name (adapter YAMLs, data files) -
is hashed separately (`inputs_digest`): the runner reruns a finished cell whose inputs changed since it ran.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

EVALUATIONS = ("test", "validate")
# Top-level keys of the run config that have no dot in their name (everything else is `section.key`).
TOP_LEVEL_KEYS = ("seed_everything", "ckpt_path")


class StudyError(ValueError):
    """A bad study spec; the message names the study config key."""


@dataclass
class CellArgs:
    """Extra command-line arguments for the cells that match.

    Attributes:
        when: axis -> label (or list of labels) a cell must have; empty: every cell.
        args: arguments appended to the matching cells' run, after the axes' (so they win).
        fit: false: the matching cells skip training and only evaluate (a base model zero-shot).
    """

    when: dict = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    fit: bool = True


@dataclass
class ReportSpec:
    """How the results are tabulated and plotted.

    Attributes:
        rows: the axis whose labels are the table's rows (default: the first axis).
        columns: the axes whose label combinations are the columns (default: every other axis).
            Cells that differ only in axes that are neither (e.g. seeds) are averaged: mean ± std (n).
        metrics: one table per metric (TensorBoard tag, or wall_time_s / peak_rss_gib / peak_cuda_gib).
        quality: the metric on the y axis of the quality-vs-cost plots.
        baseline: a label of the rows axis (e.g. `none`) that the other rows are compared with, in words.
        bars: metrics that get a bar chart each (default: `metrics` plus the efficiency metrics present).
        readme_plots: plot files (by stem) that `--readme` copies next to the README and links.
    """

    rows: Optional[str] = None
    columns: Optional[list[str]] = None
    metrics: list[str] = field(default_factory=lambda: ["val/loss"])
    quality: str = "val/loss"
    baseline: Optional[str] = None
    bars: Optional[list[str]] = None
    readme_plots: list[str] = field(default_factory=lambda: ["quality_vs_memory"])


@dataclass
class StudySpec:
    """A grid of runs: one base config, axes of overrides, what to evaluate and how to report it.

    Attributes:
        base_config: the run config every cell starts from (a LightningCLI config, e.g. configs/tiny.yaml).
        axes: config key -> values (a list, or a mapping label -> value); or a named axis whose labels map to
            several config keys each. Values are passed on the command line (mappings and lists as JSON).
        name: the study's name (default: the study config file's stem).
        output_dir: where the cells and reports go (default: studies/<name>).
        args: extra command-line arguments for every cell (e.g. [--trainer.max_steps, "150"]).
        cell_args: extra arguments for the cells matching `when`.
        exclude: cells to leave out, each {axis: label or [labels]}.
        include: extra cells, each {axis: label for every axis, plus other config keys: value}.
        evaluate: run after fit in the same process and logger: test and/or validate.
        report: tables and plots.
        quality_meaningful: false when quality numbers mean nothing (random weights); the report says so.
        note: a sentence printed at the top of the report.
        cell_timeout_s: kill a cell that runs longer (it is recorded as failed).
    """

    base_config: str
    axes: dict[str, Union[list, dict]]  # untyped values: jsonargparse would resolve class_path dicts
    name: Optional[str] = None
    output_dir: Optional[str] = None
    args: list[str] = field(default_factory=list)
    cell_args: list[CellArgs] = field(default_factory=list)
    exclude: list[dict] = field(default_factory=list)
    include: list[dict] = field(default_factory=list)
    evaluate: list[str] = field(default_factory=list)
    report: ReportSpec = field(default_factory=ReportSpec)
    quality_meaningful: bool = True
    note: Optional[str] = None
    cell_timeout_s: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.axes:
            raise StudyError("axes: give at least one axis (e.g. model.quantization: [none, nf4])")
        for stage in self.evaluate:
            if stage not in EVALUATIONS:
                raise StudyError(f"evaluate: unknown evaluation {stage!r}; choose from {', '.join(EVALUATIONS)}")
        # plain mappings (from YAML / the CLI) become the dataclasses
        if isinstance(self.report, dict):
            self.report = ReportSpec(**self.report)
        self.report = self.report or ReportSpec()
        self.cell_args = [CellArgs(**ca) if isinstance(ca, dict) else ca for ca in self.cell_args]
        names = list(self.axes)
        if self.report.rows is not None and self.report.rows not in names:
            raise StudyError(f"report.rows: {self.report.rows!r} is not an axis ({', '.join(names)})")
        for col in self.report.columns or []:
            if col not in names:
                raise StudyError(f"report.columns: {col!r} is not an axis ({', '.join(names)})")

    @property
    def row_axis(self) -> str:
        return self.report.rows or next(iter(self.axes))

    @property
    def column_axes(self) -> list[str]:
        if self.report.columns is not None:
            return list(self.report.columns)
        return [a for a in self.axes if a != self.row_axis]

    def out_dir(self) -> Path:
        return Path(self.output_dir or Path("studies") / (self.name or "study"))


@dataclass(frozen=True)
class Axis:
    """One axis: labels in order, and for each label the config keys it sets."""

    name: str
    labels: tuple[str, ...]
    sets: tuple[dict, ...]  # per label: config key -> value

    def index(self, label: str) -> int:
        return self.labels.index(label)


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        id: `<labels joined by __>-<hash>`, stable across invocations of the same spec.
        labels: axis name -> label, in axis order.
        sets: config key -> value, what the axes (and `include` extras) override.
        extra: `key=label` of the extra keys an `include` entry sets (empty for grid cells).
        args: the run's command-line arguments after `fit` (without the output folder).
        fit: whether the cell trains before its evaluations (false: the evaluations of the model as given).
    """

    id: str
    labels: dict
    sets: dict
    extra: str
    args: tuple[str, ...]
    fit: bool = True


def value_label(value: Any) -> str:
    """A short, file-name-safe label for an axis value: a config file's stem, a class's short name, ..."""
    if isinstance(value, str):
        text = Path(value).stem if value.endswith((".yaml", ".yml", ".json")) else value
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, dict) and "class_path" in value:
        text = value["class_path"].rsplit(".", 1)[-1].removesuffix("Config").lower()
    else:
        text = hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def cli_value(value: Any) -> str:
    """How a config value is written on the command line (jsonargparse parses JSON for mappings/lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _is_key(name: str) -> bool:
    return "." in name or name in TOP_LEVEL_KEYS


def build_axes(axes: dict[str, Any]) -> list[Axis]:
    """Normalise the `axes` mapping: labels, and the config keys each label sets."""
    out = []
    for name, values in axes.items():
        if isinstance(values, dict):
            labels, raw = [str(k) for k in values], list(values.values())
        elif isinstance(values, (list, tuple)):
            raw = list(values)
            labels = [value_label(v) for v in raw]
        else:
            raise StudyError(f"axes.{name}: give a list of values or a mapping label -> value, not {values!r}")
        if not raw:
            raise StudyError(f"axes.{name}: the axis has no values")
        if len(set(labels)) != len(labels):
            raise StudyError(f"axes.{name}: two values get the same label {labels}; write the axis as a mapping "
                             "label -> value")
        bad = [lab for lab in labels if not re.fullmatch(r"[A-Za-z0-9._+-]+", lab)]
        if bad:
            raise StudyError(f"axes.{name}: labels may hold letters, digits and . _ + - only: {bad}")
        bundle = not _is_key(name)
        if bundle:
            for lab, v in zip(labels, raw):
                if not isinstance(v, dict) or not v or not all(_is_key(k) for k in v):
                    raise StudyError(
                        f"axes.{name}.{lab}: {name!r} is not a config key (those have a dot, like model.adapter), "
                        "so each of its labels must map config keys to values, e.g. "
                        "{model.quantization: none, model.dtype: bfloat16}"
                    )
            sets = tuple(dict(v) for v in raw)
        else:
            sets = tuple({name: v} for v in raw)
        out.append(Axis(name, tuple(labels), sets))
    return out


def _matches(labels: dict, when: dict, axes: dict[str, Axis], where: str) -> bool:
    for axis, want in when.items():
        if axis not in axes:
            raise StudyError(f"{where}: {axis!r} is not an axis ({', '.join(axes)})")
        wanted = [value_label(w) if not isinstance(w, str) else w for w in (want if isinstance(want, list) else [want])]
        unknown = [w for w in wanted if w not in axes[axis].labels]
        if unknown:
            raise StudyError(f"{where}: {unknown} not among the labels of {axis} ({', '.join(axes[axis].labels)})")
        if labels[axis] not in wanted:
            return False
    return True


DATA_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".gguf")


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """A file's SHA-1 and, for a YAML, the file-like strings it holds; read once per version of the file (the
    cells of a study share their base config and data files)."""
    data = Path(path).read_bytes()
    names: tuple[str, ...] = ()
    if path.endswith((".yaml", ".yml")):
        try:
            names = tuple(_file_names(yaml.safe_load(data)))
        except yaml.YAMLError:
            pass  # the run itself reports a broken YAML, naming the file and line
    return hashlib.sha1(data).hexdigest(), names


def _file_names(value: Any) -> list[str]:
    """The strings in a (YAML) value that name a file by its suffix."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _file_names(v)]
    if isinstance(value, list):
        return [n for v in value for n in _file_names(v)]
    return [value] if isinstance(value, str) and value.endswith(DATA_SUFFIXES) else []


def inputs_digest(args: Sequence[str], root: Path = Path(".")) -> str:
    """A hash of the contents of every file a cell's arguments name, and of the files those YAMLs name in turn
    (relative to the naming file's folder, or to `root`): a changed base config, adapter YAML or data file
    changes it; the arguments themselves are in the cell's id."""
    seen: dict[str, str] = {}

    def visit(name: str, folder: Path) -> None:
        for candidate in (folder / name, root / name):
            if candidate.is_file():
                add(candidate)
                break

    def add(path: Path) -> None:
        key = str(path.resolve())
        if key in seen:
            return
        stat = path.stat()
        seen[key], names = _file_digest(key, stat.st_mtime_ns, stat.st_size)
        for name in names:
            visit(name, path.parent)

    for name in _file_names(list(args)):
        visit(name, root)
    return hashlib.sha1(json.dumps(sorted(seen.values())).encode()).hexdigest()[:12]


def cell_id(labels: dict, extra: str, args: list[str]) -> str:
    slug = "__".join(list(labels.values()) + ([extra] if extra else []))
    digest = hashlib.sha1(json.dumps(args).encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9._+=-]+', '-', slug)}-{digest}"


def expand(spec: StudySpec) -> list[Cell]:
    """The cells of the study, in grid order (first axis slowest), `include` cells last."""
    axes = {a.name: a for a in build_axes(spec.axes)}
    combos: list[tuple[dict, dict, str]] = []  # (labels, sets, extra)
    for labels in product(*(a.labels for a in axes.values())):
        lab = dict(zip(axes, labels))
        if any(_matches(lab, ex, axes, f"exclude[{i}]") for i, ex in enumerate(spec.exclude)):
            continue
        sets: dict = {}
        for a, label in zip(axes.values(), labels):
            sets.update(a.sets[a.index(label)])
        combos.append((lab, sets, ""))
    for i, entry in enumerate(spec.include):
        missing = [a for a in axes if a not in entry]
        if missing:
            raise StudyError(f"include[{i}]: give a label for every axis (missing: {', '.join(missing)})")
        lab, sets = {}, {}
        for name, a in axes.items():
            label = entry[name] if isinstance(entry[name], str) else value_label(entry[name])
            if label in a.labels:
                sets.update(a.sets[a.index(label)])
            elif _is_key(name):  # a new value of a key axis
                sets[name] = entry[name]
            else:
                raise StudyError(f"include[{i}].{name}: {label!r} is not a label of {name} ({', '.join(a.labels)})")
            lab[name] = label
        extras = {k: v for k, v in entry.items() if k not in axes}
        for k in extras:
            if not _is_key(k):
                raise StudyError(f"include[{i}].{k}: not an axis and not a config key")
        sets.update(extras)
        combos.append((lab, sets, ",".join(f"{k.rsplit('.', 1)[-1]}={value_label(v)}" for k, v in extras.items())))

    cells, seen = [], set()
    for lab, sets, extra in combos:
        args = ["--config", spec.base_config, *spec.args]
        for key, value in sets.items():
            args += [f"--{key}", cli_value(value)]
        fit = True
        for i, ca in enumerate(spec.cell_args):
            if _matches(lab, ca.when, axes, f"cell_args[{i}].when"):
                args += list(ca.args)
                fit = fit and ca.fit
        if not fit and not spec.evaluate:
            raise StudyError(f"cell_args: cell {'__'.join(lab.values())} neither trains (fit: false) nor evaluates; "
                             "set evaluate: [test] or [validate]")
        cid = cell_id(lab, extra, [*args, "evaluate", *spec.evaluate, *([] if fit else ["no-fit"])])
        if cid in seen:
            raise StudyError(f"include: cell {cid} is already in the grid")
        seen.add(cid)
        cells.append(Cell(cid, lab, sets, extra, tuple(args), fit))
    return cells
