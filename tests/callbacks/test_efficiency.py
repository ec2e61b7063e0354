"""The efficiency callback: token counts equal the batches' real tokens, the keys are logged during a tiny fit,
MFU follows our FLOP count, and there is no MFU on a CPU."""

import json

import peft
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_qpeft.callbacks.efficiency import COUNTERS, EfficiencyMonitor, batch_counts
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.model.module import QPeftModule
from lightning_qpeft.utils.flops import TransformerShape, training_flops
from tests.conftest import cpu_trainer
from tests.test_cli import scalars


def counts(batch):
    return dict(zip(COUNTERS, batch_counts(batch).tolist()))


def test_padded_batch_counts_by_hand():
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]]),
    }
    # 5 real tokens; the loss predicts labels[:, 1:]: 5, 6 and 7; causal pairs (1+2+3) + (1+2)
    assert counts(batch) == dict(tokens=5, supervised_tokens=3, positions=8, samples=2, attention_pairs=9)


def test_packed_row_counts_every_record():
    # two records of 3 and 2 tokens in one row, no padding and no mask (the packed-batch convention)
    batch = {"input_ids": torch.tensor([[1, 5, 6, 1, 7]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
             "labels": torch.tensor([[-100, 5, 6, -100, 7]])}
    assert counts(batch) == dict(tokens=5, supervised_tokens=3, positions=5, samples=2, attention_pairs=9)


class BatchRecorder(Callback):
    """Sums the real tokens of the batches trained on after `after` optimizer steps."""

    def __init__(self, after):
        self.after, self.tokens, self.supervised = after, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.after:
            self.tokens += int(batch["attention_mask"].sum())
            self.supervised += int((batch["labels"][:, 1:] != -100).sum())


def test_tiny_fit_logs_perf_keys_and_writes_summary(tiny_model_dir, tmp_path):
    module = QPeftModule(tiny_model_dir, compute_dtype="float32", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = NLGDataModule(tiny_model_dir, source_max_len=64, target_max_len=32, batch_size=4, max_train_records=64)
    monitor = EfficiencyMonitor(warmup_steps=1, window=3, profile_steps=1)  # profiled step 2 is not measured
    recorder = BatchRecorder(after=2)
    logger = TensorBoardLogger(tmp_path, name="logs")
    trainer = cpu_trainer(max_steps=7, limit_val_batches=0, logger=logger, callbacks=[monitor, recorder])
    trainer.fit(module, data)

    summary = json.loads((tmp_path / "logs" / "version_0" / "perf.json").read_text())
    assert summary["measured_steps"] == 5 and summary["warmup_steps"] == 1
    assert summary["profile"]["steps"] == 1 and summary["profile"]["wall_s_per_step"] > 0
    assert (tmp_path / "logs" / "version_0" / "profile.txt").read_text().startswith("profile of 1 optimizer step")
    assert summary["tokens"] == recorder.tokens  # the measured batches' real tokens, exactly
    assert summary["supervised_tokens"] == recorder.supervised
    assert summary["samples"] == 5 * 4
    assert summary["tokens_per_s"] == pytest.approx(recorder.tokens / summary["seconds"])
    assert summary["peak_memory_gib"] > 0 and "RSS" in summary["memory_kind"]
    # CPU: no peak FLOP/s, so no MFU anywhere
    assert summary["mfu"] is None and summary["peak_flops"] is None
    logged = scalars(tmp_path / "logs" / "version_0")
    for key in ("perf/tokens_per_s", "perf/supervised_tokens_per_s", "perf/step_time", "perf/peak_memory_gib"):
        assert [s for s, _ in logged[key]] == [5, 7], key  # a full window of 3 steps, then the last 2
    assert "perf/mfu" not in logged

    # with a peak, MFU = our FLOP count / (seconds x peak)
    monitor.peak = 1e12
    rates = monitor._rates(monitor.totals, monitor.totals["seconds"], 5, 0)
    shape = TransformerShape.from_config(module.model.config)
    trained = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    flops = training_flops(shape, recorder.tokens, summary["attention_pairs"], trained)
    assert summary["model_flops"] == pytest.approx(flops.model)
    assert rates["perf/mfu"] == pytest.approx(flops.model / (summary["seconds"] * 1e12))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="efficiency.window"):
        EfficiencyMonitor(window=0)
    with pytest.raises(ValueError, match="efficiency.warmup_steps"):
        EfficiencyMonitor(warmup_steps=-1)


def test_warmup_epochs_measure_exactly_the_second_epoch(tiny_model_dir, tmp_path):
    module = QPeftModule(tiny_model_dir, compute_dtype="float32", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                         adapter=peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = NLGDataModule(tiny_model_dir, source_max_len=64, target_max_len=32, batch_size=4, max_train_records=14)
    monitor = EfficiencyMonitor(warmup_steps=0, warmup_epochs=1, window=100, filename=None)
    cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[monitor]).fit(module, data)
    # 14 training records in batches of 4 (the last of 2): the measured epoch is its 4 steps and all 14 records
    assert monitor.summary["measured_steps"] == 4
    assert monitor.summary["samples"] == len(data.tokenized["train"]) == 14


def test_ddp_window_sums_tokens_over_ranks_and_takes_the_slowest_clock():
    """Two ranks: global tokens/s = all ranks' tokens / the slowest rank's seconds; per device = that / 2."""
    from types import SimpleNamespace

    monitor = EfficiencyMonitor(warmup_steps=0, window=4)
    monitor.device, monitor.world_size, monitor.shape, monitor.peak = torch.device("cpu"), 2, None, None
    monitor.window_counts = torch.tensor([100, 40, 120, 4, 900])  # this rank's window
    monitor.window_first_step, monitor.paused, monitor.history = 0, 0.0, []
    monitor.window_start = __import__("time").perf_counter() - 1.0  # this rank: ~1 s
    other = torch.tensor([300, 60, 380, 12, 2000, 2.0, 5 * 2**30], dtype=torch.float64)  # the other: 2 s, 5 GiB
    logged = []
    strategy = SimpleNamespace(all_gather=lambda t: torch.stack([t, other]))
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)))
    trainer = SimpleNamespace(global_step=4, strategy=strategy, loggers=[logger])
    monitor._close_window(trainer)
    step, m = logged[0]
    assert step == 4
    assert m["perf/tokens_per_s"] == pytest.approx(400 / 2.0)
    assert m["perf/tokens_per_s_per_device"] == pytest.approx(200 / 2.0)
    assert m["perf/supervised_tokens_per_s"] == pytest.approx(100 / 2.0)
    assert m["perf/step_time"] == pytest.approx(0.5)
    assert m["perf/peak_memory_gib"] == pytest.approx(5.0)  # the larger of the two ranks
    assert monitor.totals["tokens"] == 400 and monitor.window_counts.sum() == 0


def test_setup_memory_history_starts_at_setup_and_is_written_and_stopped(tmp_path, monkeypatch):
    # CUDA's recorder mocked (no GPU here): it starts in setup and `_write_setup_memory` (which on_train_start
    # calls on CUDA once it has read the set-up peaks; on_train_start itself needs a GPU) stops it and leaves the file
    import pickle
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"segments": ["seen"]})
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), log_dir=str(tmp_path),
                              default_root_dir=str(tmp_path), global_rank=1)
    cb = EfficiencyMonitor(record_setup_memory=True)
    cb.setup(trainer, None, "fit")
    assert cb.recording and calls == [{"max_entries": 1_000_000, "stacks": "python"}]
    cb._write_setup_memory(trainer)
    assert not cb.recording and calls[-1] == {"enabled": None}
    assert pickle.loads((tmp_path / "setup_memory_rank1.pickle").read_bytes()) == {"segments": ["seen"]}
    off = EfficiencyMonitor()
    off.setup(trainer, None, "fit")
    assert not off.recording and len(calls) == 2


def test_setup_memory_history_warns_on_a_cpu():
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb = EfficiencyMonitor(record_setup_memory=True)
    with pytest.warns(UserWarning, match="efficiency.record_setup_memory: CUDA only"):
        cb.setup(trainer, None, "fit")
    assert not cb.recording
