"""Training efficiency: tokens/s, supervised tokens/s, step time, peak memory and MFU, per window and per fit.

Config keys (`efficiency.*`, a top-level section of the CLI config; on by default):
    enabled:       turn the callback off
    warmup_steps:  optimizer steps left out of the measurement (CUDA/allocator warm-up, torch.compile)
    warmup_epochs: also wait for this many epochs (whole-epoch measurements: the same records as another run)
    window:        optimizer steps per measurement window: one GPU synchronisation and one log entry a window
    peak_flops:    the device's peak FLOP/s for MFU (default: `utils/flops.py`'s table; None on a CPU)
    filename:      the end-of-fit summary, written atomically beside the logs (`<log_dir>/perf.json`)
    profile_steps: profile this many optimizer steps after the warm-up (torch.profiler; they are not measured)
                   and write where the GPU time goes to `<log_dir>/profile.txt` (`utils/profiling.py`)
    record_setup_memory: CUDA: record every allocation from the start of fit (loading, adapter, DDP/FSDP
                   wrapping) to the first step and write `<log_dir>/setup_memory_rank<R>.pickle` (open it at
                   https://pytorch.org/memory_viz): where a set-up peak comes from

Logged every window, to every logger (TensorBoard by default), at the window's last step:
    perf/tokens_per_s             real (non-pad) tokens: attention_mask.sum(), or input_ids.numel() for
                                  batches without a mask (packed); global under DDP (summed over ranks)
    perf/tokens_per_s_per_device  the same divided by the number of processes
    perf/supervised_tokens_per_s  tokens the loss is computed on: labels[:, 1:] != -100 (the shift the loss makes)
    perf/samples_per_s            records (packed rows count the records in them)
    perf/step_time                seconds per optimizer step
    perf/peak_memory_gib          CUDA: torch.cuda.max_memory_allocated (tensors), max over ranks; CPU: the
                                  process's peak resident set size (ru_maxrss); perf.json says which
    perf/mfu, perf/hfu            model / hardware FLOP utilisation (`utils/flops.py`); only where the peak is known
    perf/pad_fraction             padded positions / all positions

Timing: the GPU runs ahead of Python, so a window is timed between two `torch.cuda.synchronize()` calls, one a
window, not one a step. Token counts are summed on the device (no sync per step) and read at the window's end.
Validation inside fit is not counted: the clock pauses from its start to its end.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import IGNORE_INDEX
from lightning_qpeft.core.versions import library_versions
from lightning_qpeft.utils.atomic import atomic_file
from lightning_qpeft.utils.flops import TransformerShape, peak_flops, training_flops
from lightning_qpeft.utils.profiling import StepProfiler

GIB = 2**30
# per-batch counters, summed on the device: real tokens, supervised tokens, all positions, records, causal pairs
COUNTERS = ("tokens", "supervised_tokens", "positions", "samples", "attention_pairs")


def batch_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's counters (`COUNTERS`), as one int64 tensor on the batch's device (no host sync).

    `attention_pairs` is the sum over records of T(T+1)/2: each real token attends to itself and to the
    tokens before it in its record, i.e. its position in the record + 1.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = mask.to(torch.int64)
    if position_ids is not None:  # packed rows: positions restart at 0 for every record
        positions = position_ids.to(torch.int64).expand_as(ids) + 1
        samples = ((position_ids.expand_as(ids) == 0) & (mask > 0)).sum()
    else:  # right- or left-padded rows: a record per row
        positions = mask.cumsum(dim=1)
        samples = (mask.sum(dim=1) > 0).sum()
    labels = batch.get("labels")
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else mask.new_zeros(())
    return torch.stack([
        mask.sum(),
        supervised.to(torch.int64),
        mask.new_full((), ids.numel()),  # a fill kernel, not a host-to-device copy
        samples.to(torch.int64),
        (positions * mask).sum(),
    ])


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory so far and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS (ru_maxrss)"


class EfficiencyMonitor(Callback):
    """Measures training throughput, memory and MFU (see the module docstring); on by default in the CLI.

    Args:
        enabled: set False to measure nothing.
        warmup_steps: optimizer steps before the measurement starts.
        warmup_epochs: epochs before the measurement starts (it starts once both warm-ups are over).
        window: optimizer steps per measurement window (and log entry).
        peak_flops: peak FLOP/s of one device for MFU; default: our table (None on a CPU: no MFU).
        filename: name of the end-of-fit summary in the log folder (JSON); None: no file.
        profile_steps: optimizer steps to profile between the warm-up and the measurement (0: none).
        record_setup_memory: CUDA allocation history of the set-up, written at the first step (see above).
    """

    # which way each logged metric is better (metrics_file.py writes them beside the metrics)
    metric_directions = {"perf/tokens_per_s*": "higher", "perf/supervised_tokens_per_s": "higher",
                         "perf/samples_per_s": "higher", "perf/mfu": "higher", "perf/hfu": "higher",
                         "perf/step_time": "lower", "perf/peak_memory_gib*": "lower", "perf/pad_fraction": "lower"}

    def __init__(
        self,
        enabled: bool = True,
        warmup_steps: int = 3,
        warmup_epochs: int = 0,
        window: int = 10,
        peak_flops: Optional[float] = None,
        filename: Optional[str] = "perf.json",
        profile_steps: int = 0,
        record_setup_memory: bool = False,
    ) -> None:
        if warmup_steps < 0:
            raise ConfigError("efficiency.warmup_steps", str(warmup_steps), "use 0 or more")
        if warmup_epochs < 0:
            raise ConfigError("efficiency.warmup_epochs", str(warmup_epochs), "use 0 or more")
        if profile_steps < 0:
            raise ConfigError("efficiency.profile_steps", str(profile_steps), "use 0 or more")
        if window < 1:
            raise ConfigError("efficiency.window", str(window), "use 1 or more")
        self.enabled = enabled
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.window = window
        self.peak_flops_override = peak_flops
        self.filename = filename
        self.profile_steps = profile_steps
        self.record_setup_memory = record_setup_memory
        self.recording = False
        self.profiler: Optional[StepProfiler] = None
        self.profile: Optional[dict[str, Any]] = None
        self.summary: Optional[dict[str, Any]] = None
        self.history: list[dict[str, float]] = []
        self.start_step: Optional[int] = None  # the step the measurement started at (None: not measuring)
        self.totals = dict.fromkeys((*COUNTERS, "seconds", "steps"), 0.0)
        self.paused = 0.0
        self.pause_start: Optional[float] = None  # validate/test outside fit never pause a measurement
        self.resident_at_start: Optional[int] = None
        self.peak_at_start: Optional[int] = None

    # --------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        self.device = trainer.strategy.root_device
        if self.device.type == "cuda":  # peaks of this fit, the model's weights included (loaded after setup)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.record_setup_memory:
            if self.device.type == "cuda":
                # Python stacks: what finding the set-up peak needs (C++ frames cost more to record and symbolise)
                torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
                self.recording = True
            else:
                rank_zero_warn("efficiency.record_setup_memory: CUDA only; nothing is recorded on "
                               f"{self.device.type}")

    def _write_setup_memory(self, trainer: Trainer) -> None:
        import pickle

        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"setup_memory_rank{trainer.global_rank}.pickle"
        with atomic_file(path, "wb") as f:
            pickle.dump(snapshot, f)
        rank_zero_info(f"efficiency: set-up memory history in {path} (https://pytorch.org/memory_viz)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        self.device = trainer.strategy.root_device
        self.world_size = trainer.world_size
        model = getattr(pl_module, "model", None) or pl_module
        self.recompute = bool(getattr(model, "is_gradient_checkpointing", False))
        self.shape: Optional[TransformerShape] = None
        try:
            self.shape = TransformerShape.from_config(getattr(model, "config", None))
        except ValueError as e:
            rank_zero_warn(f"efficiency: no MFU ({e})")
        self.trained_params, self.frozen_matmul = self._parameter_split(model)
        if self.peak_flops_override is not None:
            self.peak, self.peak_source = float(self.peak_flops_override), "efficiency.peak_flops"
        else:
            self.peak, self.peak_source = peak_flops(self.device, trainer.precision)
        self.resident_at_start = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        # the peak of loading and wrapping alone (rank 0's): tells a set-up peak from a training one
        self.peak_at_start = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        if self.recording:
            self._write_setup_memory(trainer)
        self.first_step = trainer.global_step  # a resumed fit starts at its checkpoint's step
        self.first_epoch = trainer.current_epoch
        self.start_step = None
        self.peak_bytes = 0.0
        self.window_counts = torch.zeros(len(COUNTERS), dtype=torch.int64, device=self.device)
        self.totals = dict.fromkeys((*COUNTERS, "seconds", "steps"), 0.0)
        self.window_start = 0.0
        self.window_first_step = 0
        self.paused = 0.0
        self.pause_start: Optional[float] = None
        self.history = []
        self.summary = None
        self.profile = None
        if self._warm(trainer):
            self._after_warmup(trainer)

    def _warm(self, trainer: Trainer) -> bool:
        return (trainer.global_step - self.first_step >= self.warmup_steps
                and trainer.current_epoch - self.first_epoch >= self.warmup_epochs)

    def _after_warmup(self, trainer: Trainer) -> None:
        """Profile first if asked (those steps are slowed by the profiler), then measure."""
        if self.profile_steps and self.profile is None:
            self._sync()
            self.profiler = StepProfiler(self.device)
            self.profile_start = (trainer.global_step, time.perf_counter())
        else:
            self._start_measuring(trainer)

    def _stop_profiling(self, trainer: Trainer) -> None:
        self._sync()
        steps = trainer.global_step - self.profile_start[0]
        self.profile, text = self.profiler.stop(time.perf_counter() - self.profile_start[1], steps)
        self.profiler = None
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        if trainer.is_global_zero:
            rank_zero_info(text)
            with atomic_file(log_dir / "profile.txt", "w") as f:
                f.write(text)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self.start_step is None and self.profiler is None and self._warm(trainer):
            self._after_warmup(trainer)

    def _parameter_split(self, model: torch.nn.Module) -> tuple[int, Optional[int]]:
        """(trainable matmul parameters, frozen matmul parameters or None for 'all of N')."""
        trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "embed" not in n)
        from lightning_qpeft.model.adapters import is_peft

        if is_peft(model) or self.shape is None:
            return trained, None  # an adapter beside a frozen base: N frozen
        return trained, max(self.shape.matmul_params - trained, 0)  # full fine-tuning: the base trains

    # --------------------------------------------------------------------------------------------- counting
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.enabled and self.start_step is not None:
            self.window_counts += batch_counts(batch).to(self.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        step = trainer.global_step
        if self.profiler is not None:
            if step - self.profile_start[0] >= self.profile_steps:
                self._stop_profiling(trainer)
                self._start_measuring(trainer)
            return
        if self.start_step is None:
            if self._warm(trainer):
                self._after_warmup(trainer)
            return
        if step - self.window_first_step >= self.window:
            self._close_window(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and trainer.state.fn == TrainerFn.FITTING and self.start_step is not None:
            self._sync()
            self.pause_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self.pause_start is not None:
            self._sync()
            self.paused += time.perf_counter() - self.pause_start
            self.pause_start = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        if self.profiler is not None:
            self._stop_profiling(trainer)
        if self.start_step is not None and trainer.global_step > self.window_first_step:
            self._close_window(trainer)
        self.start_step = None  # a later validate/test in this process is not measured
        if self.totals["steps"] == 0:
            rank_zero_info(f"efficiency: nothing measured ({trainer.global_step - self.first_step} steps, "
                           f"warm-up {self.warmup_steps}); no {self.filename}")
            return
        self.summary = self._summarise(trainer)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        if trainer.is_global_zero:
            rank_zero_info(format_summary(self.summary))
            if self.filename:
                path = log_dir / self.filename
                with atomic_file(path, "w") as f:
                    json.dump(self.summary, f, indent=2)
                self.summary["path"] = str(path)

    # --------------------------------------------------------------------------------------------- windows
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start_measuring(self, trainer: Trainer) -> None:
        self._sync()
        self.start_step = self.window_first_step = trainer.global_step
        self.window_counts.zero_()
        self.paused = 0.0
        self.window_start = time.perf_counter()

    def _close_window(self, trainer: Trainer) -> None:
        """Synchronise once, read the window's counts (summed over ranks), log its rates."""
        self._sync()
        now = time.perf_counter()
        seconds = now - self.window_start - self.paused
        steps = trainer.global_step - self.window_first_step
        peak, _ = peak_memory_bytes(self.device)
        local = torch.cat([self.window_counts.double(), torch.tensor([seconds, peak], dtype=torch.float64,
                                                                     device=self.device)])
        gathered = trainer.strategy.all_gather(local).reshape(-1, local.numel()).cpu()
        counts = dict(zip(COUNTERS, gathered[:, : len(COUNTERS)].sum(0).tolist()))
        seconds = float(gathered[:, len(COUNTERS)].max())  # the slowest rank bounds the global rate
        peak_bytes = float(gathered[:, len(COUNTERS) + 1].max())
        for k, v in counts.items():
            self.totals[k] += v
        self.totals["seconds"] += seconds
        self.totals["steps"] += steps
        self.peak_bytes = peak_bytes
        metrics = self._rates(counts, seconds, steps, peak_bytes)
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.window_counts.zero_()
        self.window_first_step = trainer.global_step
        self.paused = 0.0
        self.window_start = time.perf_counter()

    def _rates(self, counts: dict[str, float], seconds: float, steps: float, peak_bytes: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        metrics = {
            "perf/tokens_per_s": counts["tokens"] / seconds,
            "perf/tokens_per_s_per_device": counts["tokens"] / seconds / self.world_size,
            "perf/supervised_tokens_per_s": counts["supervised_tokens"] / seconds,
            "perf/samples_per_s": counts["samples"] / seconds,
            "perf/step_time": seconds / max(steps, 1),
            "perf/peak_memory_gib": peak_bytes / GIB,
            "perf/pad_fraction": 1.0 - counts["tokens"] / max(counts["positions"], 1.0),
        }
        flops = self._flops(counts)
        if flops is not None and self.peak:
            available = seconds * self.world_size * self.peak
            metrics["perf/mfu"] = flops.model / available
            metrics["perf/hfu"] = flops.hardware / available
        return metrics

    def _flops(self, counts: dict[str, float]):
        if self.shape is None:
            return None
        return training_flops(self.shape, counts["tokens"], counts["attention_pairs"], self.trained_params,
                              self.frozen_matmul, self.recompute)

    def _summarise(self, trainer: Trainer) -> dict[str, Any]:
        t = self.totals
        rates = self._rates(t, t["seconds"], t["steps"], self.peak_bytes)
        flops = self._flops(t)
        _, memory_kind = peak_memory_bytes(self.device)
        summary: dict[str, Any] = {
            **{k.split("/", 1)[1]: v for k, v in rates.items()},
            "measured_steps": int(t["steps"]),
            "warmup_steps": self.warmup_steps,
            "warmup_epochs": self.warmup_epochs,
            "seconds": t["seconds"],
            **{k: int(t[k]) for k in COUNTERS},
            "world_size": self.world_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device),
            "precision": str(trainer.precision),
            "versions": library_versions(),
            "memory_kind": memory_kind,
            "peak_memory_reserved_gib": (torch.cuda.max_memory_reserved(self.device) / GIB
                                         if self.device.type == "cuda" else None),
            # what stays on this rank's device once the model is set up (weights, adapter; under FSDP the shard):
            # the figure that falls with 1/N under FSDP, unlike the peak, which includes loading
            "resident_memory_gib_at_train_start": self.resident_at_start / GIB if self.resident_at_start else None,
            "peak_memory_gib_at_train_start": self.peak_at_start / GIB if self.peak_at_start else None,
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "gradient_checkpointing": self.recompute,
            "trained_params": self.trained_params,
            "model_flops": flops.model if flops else None,
            "hardware_flops": flops.hardware if flops else None,
            "flop_formula": "model = tokens*(4*N_frozen + 6*P_trained) + 3*attention_fwd; hardware adds "
                            "tokens*2*(N_body + P_trained) + attention_fwd with gradient checkpointing "
                            "(lightning_qpeft/utils/flops.py)",
            "shape": asdict(self.shape) if self.shape else None,
            "matmul_params": self.shape.matmul_params if self.shape else None,
            "profile": self.profile,
            "windows": self.history,
        }
        summary.setdefault("mfu", None)
        summary.setdefault("hfu", None)
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-fit table (printed by rank zero)."""
    def fmt(v: Any, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("measured", f"{s['measured_steps']} steps after a warm-up of {s['warmup_steps']} steps"
                     f"{f' and {e} epoch(s)' if (e := s.get('warmup_epochs')) else ''}, {s['seconds']:.2f} s"),
        ("tokens/s", f"{fmt(s['tokens_per_s'], ',.0f')} ({fmt(s['tokens_per_s_per_device'], ',.0f')} per device, "
                     f"{s['world_size']} device(s))"),
        ("supervised tokens/s", fmt(s["supervised_tokens_per_s"], ",.0f")),
        ("samples/s", fmt(s["samples_per_s"], ",.2f")),
        ("step time", f"{fmt(s['step_time'], '.4f')} s"),
        ("peak memory", f"{fmt(s['peak_memory_gib'], '.2f')} GiB ({s['memory_kind']})"),
        ("pad fraction", fmt(s["pad_fraction"], ".3f")),
        ("MFU / HFU", f"{fmt(s['mfu'], '.3f')} / {fmt(s['hfu'], '.3f')} (peak {fmt(s['peak_flops'], '.3g')} "
                      f"FLOP/s: {s['peak_flops_source']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["efficiency (mean over the measured window)"] + [f"  {k:<{width}}  {v}" for k, v in rows])
