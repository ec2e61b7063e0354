"""Read a finished cell: its logged metrics, resolved config and error, as one flat result.

A cell's numbers come from the `metrics.jsonl` its run wrote (callbacks/metrics_file.py: every metric logged,
whatever logger the run used; TensorBoard's event files for runs that predate it), so results.csv holds what
the run logged. Each tag is reduced to one number: its last logged value (the end of
fit, or the evaluation after it), except `perf/peak_memory_gib`, whose maximum is kept. Tags a run did not
log (a metric its config does not compute) are simply absent; every `section/name` tag a run logs becomes a
column, so new metrics appear without changes here.

Besides the logs, the runner measures from outside: `wall_time_s` (the cell's process, start to exit),
`cpu_time_s` (its user + system CPU time: unlike wall time, barely moved by other processes on the machine)
and `peak_rss_gib` (its peak resident memory), both from `os.wait4`'s rusage of that one child (`ru_maxrss`:
CPU memory of the whole process, Python and libraries included). `peak_cuda_gib` is the process's
`torch.cuda.max_memory_allocated`, written by the cell itself.

A cell is `refused` when its run ended with a `ConfigError` (the cell records the exception's class and its bases
in error.json) or jsonargparse refused its arguments; any other exception is a failure. Each metric's direction
is the one the run declared (`metric_directions.json`, beside its metrics), or the runner's for its own figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from lightning_qpeft.callbacks.metrics_file import FILE_NAME as METRICS_FILE
from lightning_qpeft.callbacks.metrics_file import direction_of, read_directions, read_metrics
from lightning_qpeft.core.errors import ConfigError

# The metrics the report knows by name (the project's fixed tags), in the order of results.csv's columns.
QUALITY_METRICS = ("val/loss", "val/ppl", "test/loss", "test/rouge1", "test/rouge2", "test/rougeL", "test/bleu",
                   "mmlu/accuracy", "mmlu/accuracy_macro")
COST_METRICS = ("params/trainable", "params/total", "adapter/size_bytes", "perf/peak_memory_gib",
                "perf/tokens_per_s", "perf/supervised_tokens_per_s", "perf/step_time", "perf/mfu")
RUNNER_METRICS = ("wall_time_s", "cpu_time_s", "peak_rss_gib", "peak_cuda_gib")
KNOWN_METRICS = QUALITY_METRICS + COST_METRICS + ("train/loss",)
REDUCE_MAX = ("perf/peak_memory_gib",)

# the runner's own figures (measured from outside the cell), declared where they are measured
RUNNER_DIRECTIONS = {m: "lower" for m in RUNNER_METRICS}


def error_record(error: BaseException) -> dict[str, Any]:
    """What error.json holds: the exception's class, the names of it and its bases (read by `is_refused`), its
    text."""
    return {"type": type(error).__name__, "types": [c.__name__ for c in type(error).__mro__], "message": str(error)}


def is_refused(record: dict[str, Any]) -> bool:
    """Whether an error.json record is a refusal: a `ConfigError` (or a subclass), or jsonargparse's exit."""
    return ConfigError.__name__ in record.get("types", ()) or record.get("type") == "SystemExit"


def study_directions(results: Iterable[Optional[dict[str, Any]]]) -> dict[str, str]:
    """The metric directions the cells' runs declared, merged (None: a cell not run), with the runner's own."""
    merged = dict(RUNNER_DIRECTIONS)
    for res in results:
        merged.update((res or {}).get("directions", {}))
    return merged


def higher_is_better(metric: str, directions: dict[str, str]) -> Optional[bool]:
    """A metric's declared direction (`directions`: `study_directions`); None: nobody declared it."""
    found = direction_of(metric, directions)
    return None if found is None else found == "higher"


def better_words(higher: Optional[bool]) -> str:
    return {True: "higher is better", False: "lower is better", None: "direction not declared"}[higher]


def find_log_dir(run_dir: Path) -> Optional[Path]:
    """The run's log folder: where LightningCLI wrote config.yaml, else the newest folder with metrics."""
    configs = sorted(run_dir.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    if configs:
        return configs[-1].parent
    found = [*run_dir.rglob(METRICS_FILE), *run_dir.rglob("events.out.tfevents.*")]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a log folder: tag -> [(step, value), ...] in the order they were written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def reduce_scalars(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """One number per `section/name` tag: the last value, or the maximum for peak memory."""
    out = {}
    for tag, events in scalars.items():
        if "/" not in tag or not events:
            continue  # Lightning's `epoch`, the LR monitor's `lr-AdamW`
        values = [v for _, v in events]
        out[tag] = max(values) if tag in REDUCE_MAX else values[-1]
    return out


def log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:])


def collect_cell(cell_dir: Path, returncode: Optional[int]) -> dict[str, Any]:
    """Status, error and metrics of a cell whose process has ended (returncode None: it never started).

    Status: `done` (exit 0), `refused` (the run refused its config up front: error.json says so), `failed`
    (anything else: an exception, a signal, a timeout). Metrics are collected whatever the status: a run that
    failed in its evaluation still has its fit's numbers.
    """
    result: dict[str, Any] = {"status": "done", "error": "", "error_tail": "", "metrics": {}, "config": ""}
    log_dir = find_log_dir(cell_dir / "run") if (cell_dir / "run").exists() else None
    if log_dir is not None:
        written = log_dir / METRICS_FILE
        result["metrics"] = reduce_scalars(read_metrics(written) if written.exists() else read_scalars(log_dir))
        result["directions"] = read_directions(log_dir)
        if (log_dir / "config.yaml").exists():
            result["config"] = str(log_dir / "config.yaml")
        if (log_dir / "perf.json").exists():  # the environment the figures come from
            result["versions"] = json.loads((log_dir / "perf.json").read_text()).get("versions", {})
        adapter = log_dir / "adapter"
        if "adapter/size_bytes" not in result["metrics"] and adapter.is_dir():
            # an older run without the export's own log line: measure the folder the same way it does
            result["metrics"]["adapter/size_bytes"] = float(sum(f.stat().st_size for f in adapter.rglob("*")
                                                                if f.is_file()))
    process = cell_dir / "process.json"
    if process.exists():
        result["metrics"].update(json.loads(process.read_text()))
    if returncode == 0:
        return result
    error_path = cell_dir / "error.json"
    error = json.loads(error_path.read_text()) if error_path.exists() else None
    result["error_tail"] = log_tail(cell_dir / "output.log")
    if error is not None:
        result["status"] = "refused" if is_refused(error) else "failed"
        message = error["message"] if error["type"] != "SystemExit" else _last_error_line(result["error_tail"])
        result["error"] = f"{error['type']}: {message}"
    else:
        result["status"] = "failed"
        if returncode is not None and returncode < 0:
            result["error"] = f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
        else:
            result["error"] = _last_error_line(result["error_tail"]) or f"exit status {returncode}"
    return result


def _last_error_line(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln.strip()
    return lines[-1].strip() if lines else ""
