"""Run a study's cells, each in a process of its own, and skip the ones already finished.

Layout of the study folder (`output_dir`):
    cells/<cell id>/cell.json     what the cell runs (arguments, evaluations, labels)
    cells/<cell id>/output.log    the process's stdout and stderr
    cells/<cell id>/run/          its trainer.default_root_dir: lightning_logs/version_0/ (events, config.yaml,
                                  adapter/, checkpoints/)
    cells/<cell id>/result.json   status, error, metrics: written atomically, last; it marks the cell finished
    tb/<cell id>/                 the cell's hparams summary (TensorBoard's HPARAMS view of the grid)
    results.csv, report.md, plots/*.png   rewritten as cells finish by the `report` the runner is given
                                  (`report.write_reports` from the study command): a function of `StudyResults`

A cell without result.json is run (again) from scratch: its run/ is deleted first, so a study killed in the
middle of a cell loses that cell only. Killing the study kills the running cell too (PR_SET_PDEATHSIG).

Before any process starts, each pending cell's configuration is parsed and instantiated in this process
(`QPeftCLI(run=False)`, no weights loaded): a config the project refuses (unknown key or value, an impossible
combination caught by the run plan, `model/plan.py`, with the cell's trainer and data module) is recorded as
`refused` without spending a process on it. Refusals that only show when the model is built are recognised in the
cell's process by their type (`ConfigError`, recorded in error.json by `cell.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional

import lightning_qpeft
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.study.collect import collect_cell
from lightning_qpeft.study.config import Cell, StudySpec, expand, inputs_digest
from lightning_qpeft.study.results import StudyResults, cell_dir, read_result, read_results
from lightning_qpeft.utils.atomic import atomic_file

RERUN = ("none", "failed", "all")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the cell gets SIGKILL when the study process dies, so a killed study leaves no orphan."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class StudyRunner:
    """Expands a study and runs what is missing.

    Args:
        spec: the study.
        rerun: `none` (finished cells stay), `failed` (rerun failed and refused cells), `all`.
        max_cells: run at most this many cells in this invocation (the rest on the next).
        precheck: instantiate each cell's config in this process first and record refusals without a run.
        python: the interpreter of the cells' processes.
        log: where progress lines go.
        devices: CUDA device ids; cells run concurrently, one per device (CUDA_VISIBLE_DEVICES); None: one
            cell at a time, devices as the environment has them.
        workers: without `devices`, how many cells run at once (CPU studies: each process then gets
            cpu_count // workers threads through OMP_NUM_THREADS, unless the environment sets it).
        report: called with the results after every cell (`plots=False`) and at the end (`plots=True`), e.g.
            `report.write_reports`; None: the runner only writes each cell's result.json.
    """

    def __init__(self, spec: StudySpec, rerun: str = "none", max_cells: Optional[int] = None,
                 precheck: bool = True, python: str = sys.executable, log: Callable[[str], None] = print,
                 devices: Optional[list[str]] = None, workers: int = 1,
                 report: Optional[Callable[[StudyResults, bool], Any]] = None) -> None:
        if rerun not in RERUN:
            raise ValueError(f"rerun: {rerun!r}; choose one of {', '.join(RERUN)}")
        if workers < 1:
            raise ValueError(f"workers: {workers}; give at least 1")
        if devices and workers > 1:
            raise ValueError("workers and devices: set one (with devices, one cell runs on each)")
        self.spec = spec
        self.cells = expand(spec)
        self.out = spec.out_dir()
        self.rerun = rerun
        self.max_cells = max_cells
        self.precheck_enabled = precheck
        self.python = python
        self.log = log
        self.devices = [str(d) for d in devices or []]
        self.workers = workers
        self.report = report
        self._lock = threading.RLock()  # progress lines, reports and the set of live processes
        self._live: set[subprocess.Popen] = set()
        self._done = 0
        self._inputs: dict[str, str] = {}

    # ------------------------------------------------------------------------------ layout
    def cell_dir(self, cell: Cell) -> Path:
        return cell_dir(self.out, cell)

    def result(self, cell: Cell) -> Optional[dict[str, Any]]:
        return read_result(self.out, cell)

    def results(self) -> StudyResults:
        """The grid and every finished cell's result, as the study folder holds them now."""
        return read_results(self.spec, self.cells)

    def _write_report(self, plots: bool) -> None:
        if self.report is not None:
            self.report(self.results(), plots)

    def cell_args(self, cell: Cell) -> list[str]:
        # progress bars off (they would fill output.log), then the cell's own arguments, then its output folder
        # (after --config: jsonargparse applies arguments in order, so a config file overrides what precedes it)
        config, rest = list(cell.args[:2]), list(cell.args[2:])
        return [*config, "--trainer.enable_progress_bar", "false", *rest,
                "--trainer.default_root_dir", str(self.cell_dir(cell) / "run")]

    def inputs(self, cell: Cell) -> str:
        """The digest of the files the cell's arguments name (`config.inputs_digest`), computed once a run."""
        if cell.id not in self._inputs:
            self._inputs[cell.id] = inputs_digest(cell.args)
        return self._inputs[cell.id]

    def pending(self) -> list[Cell]:
        """Cells to run: no result yet, a result whose inputs changed since (a stale result is never kept), or
        what `rerun` asks for. A result from before inputs were recorded is kept."""
        todo, stale = [], []
        for cell in self.cells:
            res = self.result(cell)
            if res is not None and res.get("inputs") not in (None, self.inputs(cell)):
                stale.append(cell.id)
                todo.append(cell)
            elif res is None or self.rerun == "all" or (self.rerun == "failed" and res["status"] != "done"):
                todo.append(cell)
        if stale:
            print(f"study: {len(stale)} finished cell(s) ran on files that have changed since (base config, adapter "
                  f"or data): run again ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''})", flush=True)
        return todo

    # ------------------------------------------------------------------------------ running
    def run(self) -> list[Optional[dict[str, Any]]]:
        """Run the missing cells (at most `max_cells`), then return every cell's result (None: not run)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as lock:
            try:  # two processes running one study would run the same cells into the same folders
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"output_dir: another process is running the study in {self.out}") from None
            return self._run()

    def _run(self) -> list[Optional[dict[str, Any]]]:
        self._done = 0
        todo = self.pending()
        if self.max_cells is not None:
            todo = todo[: self.max_cells]
        self.log(f"study {self.spec.name}: {len(self.cells)} cells, {len(self.cells) - len(self.pending())} "
                 f"finished, running {len(todo)} -> {self.out}")
        refused = self.precheck(todo) if self.precheck_enabled and todo else {}
        for cell in [c for c in todo if c.id in refused]:
            shutil.rmtree(self.cell_dir(cell), ignore_errors=True)
            res = self._finish(cell, {"status": "refused", "error": refused[cell.id], "error_tail": "",
                                      "metrics": {}, "config": ""}, wall_time=None)
            self._report_progress(cell, res, len(todo))
        runnable = [c for c in todo if c.id not in refused]
        slots = self.slots()
        if len(slots) == 1:
            for cell in runnable:
                self._report_progress(cell, self.run_cell(cell, slots[0]), len(todo))
        else:
            self._run_parallel(runnable, len(todo), slots)
        self._write_report(plots=True)
        return [self.result(c) for c in self.cells]

    def slots(self) -> list[dict[str, str]]:
        """The environment of each concurrent cell: a GPU each, or a share of the CPU cores each."""
        if self.devices:
            return [{"CUDA_VISIBLE_DEVICES": d} for d in self.devices]
        if self.workers == 1 or "OMP_NUM_THREADS" in os.environ:
            return [{}] * self.workers
        # without a cap each process would start one thread per core, and N processes would fight over them
        return [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.workers))}] * self.workers

    def _run_parallel(self, cells: list[Cell], total: int, slots: list[dict[str, str]]) -> None:
        """One cell per slot at a time: each still has a process (and a GPU) of its own, so its memory
        figures stay its own."""
        free: queue.Queue = queue.Queue()
        for slot in slots:
            free.put(slot)

        def work(cell: Cell) -> None:
            slot = free.get()
            try:
                res = self.run_cell(cell, slot)
            finally:
                free.put(slot)
            self._report_progress(cell, res, total)

        pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="cell")
        futures = [pool.submit(work, c) for c in cells]
        try:
            for f in as_completed(futures):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            with self._lock:
                for proc in list(self._live):
                    proc.kill()
            raise
        finally:
            pool.shutdown(wait=True)

    def _report_progress(self, cell: Cell, res: dict[str, Any], total: int) -> None:
        with self._lock:
            self._done += 1
            wall = res["metrics"].get("wall_time_s")
            self.log(f"[{self._done}/{total}] {cell.id}: {res['status']}"
                     + (f" in {wall:.0f} s" if wall is not None else "")
                     + (f" ({res['error'][:200]})" if res["error"] else ""))
            self._write_report(plots=False)

    def precheck(self, cells: list[Cell]) -> dict[str, str]:
        """Instantiate each cell's config here (no weights, no logger); cell id -> why it was refused."""
        from lightning_qpeft.cli import QPeftCLI

        refused = {}
        quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning_fabric")]
        levels = [lg.level for lg in quiet]
        for cell in cells:
            err = io.StringIO()
            try:
                for lg in quiet:  # "Seed set", "GPU available": the cells' own logs say it
                    lg.setLevel(logging.ERROR)
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                        warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. LightningCLI's "args and sys.argv both given"
                    cli = QPeftCLI(args=[*self.cell_args(cell), "--trainer.logger", "false"], run=False)
                    # the run plan the cell's process resolves, with this cell's trainer and data module
                    cli.model.resolve_plan(cli.trainer, cli.datamodule, fitting=cell.fit)
            except SystemExit:
                # jsonargparse's usage line, then "error: ..." and its indented details
                lines = err.getvalue().splitlines()
                start = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), max(0, len(lines) - 3))
                why = " ".join(" ".join(lines[start:]).split())
                refused[cell.id] = f"configuration: {why[:600] or 'did not parse'}"
            except Exception as e:  # noqa: BLE001 - every constructor refusal counts, named as it was raised
                refused[cell.id] = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            finally:
                for lg, level in zip(quiet, levels):
                    lg.setLevel(level)
        return refused

    def run_cell(self, cell: Cell, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
        """Run one cell in its own process, collect it, and mark it finished."""
        cdir = self.cell_dir(cell)
        shutil.rmtree(cdir, ignore_errors=True)  # a half-run cell from a killed study starts over
        cdir.mkdir(parents=True)
        spec = {"id": cell.id, "labels": cell.labels, "sets": cell.sets, "args": self.cell_args(cell),
                "evaluate": list(self.spec.evaluate), "fit": cell.fit}
        with atomic_file(cdir / "cell.json", "w") as f:
            json.dump(spec, f, indent=1)
        returncode, wall, usage = self.launch(cdir, env or {})
        res = collect_cell(cdir, returncode)
        res["metrics"].update(usage)
        if returncode is None:
            res.update(status="failed", error=f"timed out after {self.spec.cell_timeout_s:.0f} s")
        return self._finish(cell, res, wall)

    def launch(self, cdir: Path, extra_env: Optional[dict[str, str]] = None) -> tuple[Optional[int], float, dict[str, float]]:
        """Run the cell's process: (exit status, None if it timed out; wall seconds; peak_rss_gib and
        cpu_time_s of that process)."""
        env = dict(os.environ)
        # the cells import the same lightning_qpeft as this process, wherever the study was started from
        root = str(Path(lightning_qpeft.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env or {})
        start = time.perf_counter()
        timed_out = threading.Event()
        with open(cdir / "output.log", "wb") as out:
            proc = subprocess.Popen([self.python, "-m", "lightning_qpeft.study.cell", str(cdir / "cell.json")],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            with self._lock:
                self._live.add(proc)
            timer = None
            if self.spec.cell_timeout_s:
                def _kill() -> None:
                    timed_out.set()
                    proc.kill()

                timer = threading.Timer(self.spec.cell_timeout_s, _kill)
                timer.start()
            try:
                # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all cells)
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
                with self._lock:
                    self._live.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB, macOS: bytes
        measured = {"peak_rss_gib": rss / 2**30, "cpu_time_s": usage.ru_utime + usage.ru_stime}
        return (None if timed_out.is_set() else proc.returncode), time.perf_counter() - start, measured

    def _finish(self, cell: Cell, res: dict[str, Any], wall_time: Optional[float]) -> dict[str, Any]:
        from lightning_qpeft.study.hparams import write_hparams

        if wall_time is not None:
            res["metrics"]["wall_time_s"] = wall_time
        res = {"id": cell.id, "labels": cell.labels, "extra": cell.extra, "inputs": self.inputs(cell), **res}
        write_hparams(self.out / "tb", cell.id, {**cell.labels, "status": res["status"]}, res["metrics"])
        with atomic_file(self.cell_dir(cell) / "result.json", "w") as f:  # last: the cell is finished
            json.dump(res, f, indent=1)
        return res
