"""Generation metrics on the built-in task: a `test` run logs ROUGE that rises after a short fit, with the
generations (and whether each stopped) written as JSONL; test and validate through the CLI."""

import json

import peft
import pytest
import torch

from lightning_qpeft.callbacks.generation_metrics import GenerationMetrics
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.evaluation.generation import score_generations
from lightning_qpeft.model.generation import Generation
from lightning_qpeft.model.module import QPeftModule
from tests.conftest import cpu_trainer


def test_test_run_logs_rouge_that_rises_after_training(tiny_model_dir, tmp_path):
    torch.manual_seed(0)  # the adapter's initialisation: the same run whatever ran before in this process
    module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                         adapter=peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                         generation=Generation(max_new_tokens=32))
    data = NLGDataModule(tiny_model_dir, source_max_len=96, target_max_len=48, batch_size=8, eval_batch_size=8,
                         max_train_records=600)
    metrics = GenerationMetrics(max_records=8, dirpath=str(tmp_path))
    before = cpu_trainer(callbacks=[metrics], limit_test_batches=1).test(module, data, verbose=False)[0]
    assert {"test/rouge1", "test/rouge2", "test/rougeL", "test/bleu", "test/loss"} <= set(before)
    cpu_trainer(max_steps=25, limit_val_batches=0).fit(module, data)
    after = cpu_trainer(callbacks=[metrics], limit_test_batches=1).test(module, data, verbose=False)[0]
    assert after["test/rouge1"] > before["test/rouge1"] + 15, (before, after)
    assert after["test/rougeL"] > before["test/rougeL"] + 10 and after["test/loss"] < before["test/loss"]
    # the random base never emits EOS; trained 25 steps on targets that end with it, some answers stop (1 of 8
    # with this seed): stopping is counted, and it rises with training
    assert before["test/stopped_fraction"] == 0 < after["test/stopped_fraction"], (before, after)
    # 8 answers of 32 tokens that never stop: 256 tokens over the decoding time
    assert before["test/generation_tokens_per_s"] * before["test/generation_s"] == pytest.approx(8 * 32)
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(set(r) == {"prompt", "prediction", "references", "stopped"} for r in rows)
    assert all(len(r["references"]) == 2 and r["prompt"].endswith("### Response: ") for r in rows)
    rescored = score_generations([r["prediction"] for r in rows], [r["references"] for r in rows])
    assert rescored == pytest.approx({k: after[f"test/{k}"] for k in rescored}, abs=1e-3)


def test_cli_test_and_validate_log_generation_metrics(tiny_model_dir, tmp_path):
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_qpeft.cli import QPeftCLI

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    common = ["--config", str(config), "--model.base_model", tiny_model_dir, "--trainer.default_root_dir",
              str(tmp_path), "--trainer.enable_progress_bar", "false", "--model.generation.max_new_tokens", "6",
              "--generation_metrics.max_records", "4", "--data.eval_batch_size", "4"]
    QPeftCLI(args=["test", *common, "--trainer.limit_test_batches", "1"])
    QPeftCLI(args=["validate", *common, "--trainer.limit_val_batches", "1", "--data.max_train_records", "100"])
    for version, stage in (("version_0", "test"), ("version_1", "val")):
        folder = tmp_path / "lightning_logs" / version
        ea = EventAccumulator(str(folder))
        ea.Reload()
        assert {f"{stage}/{k}" for k in ("rouge1", "rouge2", "rougeL", "bleu", "loss")} <= set(ea.Tags()["scalars"])
        rows = (folder / f"{stage}_generations.jsonl").read_text().splitlines()
        assert len(rows) == 4


def test_generation_speed_counts_each_answer_up_to_its_stop_token():
    from types import SimpleNamespace

    pad, stop = 0, 9
    answers = torch.tensor([[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]])  # 2 tokens, 4 (no stop), 1: 7 in all
    dm = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=pad), eval_batch_size=8, stop_ids=[stop],
                         decode=lambda t: (["x"] * len(t), [bool((r == stop).any()) for r in t]))
    module = SimpleNamespace(device=torch.device("cpu"), generate=lambda ids, mask, stops, p: answers[: len(ids)])
    records = [{"input_ids": [1, 2, 3][: n], "prompt": "p", "output": "o"} for n in (3, 2, 1)]
    rows, timing = GenerationMetrics()._generate(records, dm, module)
    assert len(rows) == 3 and timing["generation_s"] > 0
    assert timing["generation_tokens_per_s"] * timing["generation_s"] == pytest.approx(7)
