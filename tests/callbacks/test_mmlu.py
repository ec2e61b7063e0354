"""The MMLU callback: when it runs in fit (baseline, every N validations, end), what it logs, the report it
writes; `validate` from the CLI on a bare base and on a trained adapter; bad settings refused up front."""

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_qpeft.callbacks import AdapterExport, MMLUEvaluation
from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.data.datamodule import NLGDataModule
from lightning_qpeft.evaluation.mmlu import MMLUEvaluator
from lightning_qpeft.evaluation.mmlu_sources import load_items
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.module import QPeftModule
from lightning_qpeft.tasks import synthetic_mc
from tests.conftest import cpu_trainer
from tests.test_cli import scalars

ROOT = Path(__file__).resolve().parents[2]
LORA = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def module(tiny_model_dir):
    return QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32", adapter=LORA,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))


def data(tiny_model_dir):
    return NLGDataModule(tiny_model_dir, task="synthetic-mc", batch_size=8, source_max_len=96, target_max_len=2,
                         max_train_records=64)


def test_fit_evaluates_at_start_every_second_validation_and_at_the_end(tiny_model_dir, tmp_path):
    mmlu = MMLUEvaluation(enabled=True, source="synthetic", split="test", shots=0, synthetic_questions=5,
                          at_fit_start=True, every_n_validations=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = cpu_trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=logger, callbacks=[mmlu])
    pl_module = module(tiny_model_dir)
    trainer.fit(pl_module, data(tiny_model_dir))

    logged = scalars(tmp_path)
    # step 0 (at_fit_start), validations after steps 2, 4, 6 -> the 2nd (logged at 3, where Lightning logs
    # val/loss of that validation); the end of training (step 6)
    assert [s for s, _ in logged["mmlu/accuracy"]] == [0, 3, 6]
    assert [s for s, _ in logged["mmlu/food"]] == [0, 3, 6]
    for name in ("mmlu/accuracy_macro", "mmlu/loss", "mmlu/lm_loss", "mmlu/food", "mmlu/category/stem",
                 "mmlu/category/humanities", "mmlu/category/social_sciences", "mmlu/category/other"):
        assert name in logged, name
    assert "mmlu/accuracy" in trainer.callback_metrics  # logged through the module: checkpoints can monitor it

    report = json.loads((tmp_path / "mmlu_test.json").read_text())
    assert report["global_step"] == 6 and report["stage"] == "fit" and report["overall"]["questions"] == 20
    assert report["k_histogram"] == {"0": 20} and len(report["questions"]) == 20
    # the logged number is the trained model's, as an independent evaluation computes it
    items = load_items("synthetic", trainer.datamodule.tokenizer, None, "test", 0, synthetic_questions=5)
    direct = MMLUEvaluator(items, trainer.datamodule.tokenizer).evaluate(pl_module.model).metrics()
    assert report["overall"]["accuracy"] == direct["mmlu/accuracy"]
    assert logged["mmlu/accuracy"][-1][1] == pytest.approx(direct["mmlu/accuracy"])  # TensorBoard keeps float32
    assert report["overall"]["loss"] == pytest.approx(direct["mmlu/loss"], abs=1e-6)


def validate_args(tiny_model_dir, root, csv_folder, *extra):
    return ["validate", "--config", str(ROOT / "configs" / "mmlu.yaml"), "--model.base_model", tiny_model_dir,
            "--model.compute_dtype", "float32", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--data.max_train_records", "16", "--mmlu.source", "csv", "--mmlu.path", str(csv_folder),
            "--mmlu.shots", "2", *extra]


def test_validate_evaluates_a_bare_base_and_a_trained_adapter(tiny_model_dir, tmp_path):
    csv_folder = synthetic_mc.write_mmlu_csv(tmp_path / "mmlu", {"val": 5, "test": 1})
    adapter = tmp_path / "adapter"
    pl_module = module(tiny_model_dir)
    cpu_trainer(max_steps=5, limit_val_batches=0, callbacks=[AdapterExport(str(adapter))]).fit(pl_module, data(tiny_model_dir))

    QPeftCLI(args=validate_args(tiny_model_dir, tmp_path / "base", csv_folder))
    QPeftCLI(args=validate_args(tiny_model_dir, tmp_path / "tuned", csv_folder, "--model.adapter_path", str(adapter)))
    base = json.loads(next((tmp_path / "base").rglob("mmlu_val.json")).read_text())
    tuned = json.loads(next((tmp_path / "tuned").rglob("mmlu_val.json")).read_text())
    assert base["adapter"] == "none" and tuned["adapter_path"] == str(adapter) and tuned["adapter"] == "lora"
    assert base["stage"] == "validate" and base["source"] == "csv" and base["shots"] == 2
    assert base["overall"]["questions"] == tuned["overall"]["questions"] == 20
    assert base["k_histogram"] == {"2": 20} and base["subjects"]["food"]["k"] == {"2": 5}

    # each report is what plain peft + the scorer give for that model
    tokenizer = load_tokenizer_for(tiny_model_dir)
    items = load_items("csv", tokenizer, str(csv_folder), "val", shots=2)
    plain = peft.PeftModel.from_pretrained(load_base_model(tiny_model_dir, "nf4-dq", compute_dtype="float32"), str(adapter))
    expected = MMLUEvaluator(items, tokenizer).evaluate(plain)
    assert [q["prediction"] for q in tuned["questions"]] == expected.predictions
    with plain.disable_adapter():
        expected_base = MMLUEvaluator(items, tokenizer).evaluate(plain)
    assert [q["prediction"] for q in base["questions"]] == expected_base.predictions
    assert tuned["overall"]["loss"] != base["overall"]["loss"]  # the adapter changed the scores


def test_validate_scores_the_repositorys_mmlu_in_a_clone_without_shared(tiny_model_dir, tmp_path, monkeypatch):
    """configs/mmlu.yaml as a new user runs it: a clone holding configs/ and data/mmlu's CSVs, nothing beside it;
    the five-shot val file is built on first use, with QLoRA's md5, and its questions are scored."""
    import hashlib

    from lightning_qpeft.evaluation.mmlu_data import read_qlora_json
    from lightning_qpeft.evaluation.mmlu_files import PROMPT_FILES

    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "configs", clone / "configs")
    shutil.copytree(ROOT / "data", clone / "data", ignore=shutil.ignore_patterns("*.json"))
    assert not (clone.parent / "shared").exists() and not list((clone / "data" / "mmlu").glob("*.json"))
    monkeypatch.chdir(clone)
    QPeftCLI(args=["validate", "--config", "configs/mmlu.yaml", "--model.base_model", tiny_model_dir,
                   "--model.compute_dtype", "float32", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", "run", "--trainer.enable_progress_bar", "false",
                   "--mmlu.max_samples", "12"])

    built = clone / "data" / "mmlu" / "five_shot_mmlu_val.json"
    assert hashlib.md5(built.read_bytes()).hexdigest() == PROMPT_FILES[built.name].md5
    report = json.loads(next((clone / "run").rglob("mmlu_five_shot_mmlu_val.json")).read_text())
    assert report["path"] == "data/mmlu/five_shot_mmlu_val.json" and report["source"] == "json"
    assert report["overall"]["questions"] == 12 and report["k_histogram"] == {"5": 12}
    first = read_qlora_json(built)[:12]  # the file's first 12 questions (mmlu.max_samples), answers as QLoRA's
    assert [(q["subject"], q["answer"]) for q in report["questions"]] == [(it.subject, it.answer) for it in first]
    assert all(q["prediction"] in "ABCD" for q in report["questions"])


def load_tokenizer_for(path):
    from lightning_qpeft.base_models.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_validate_with_no_validation_batch_is_refused(tiny_model_dir, tmp_path):
    csv_folder = synthetic_mc.write_mmlu_csv(tmp_path / "mmlu", {"val": 1, "test": 1})
    with pytest.raises(ValueError, match="trainer.limit_val_batches: 0 makes Lightning skip"):
        QPeftCLI(args=validate_args(tiny_model_dir, tmp_path, csv_folder, "--trainer.limit_val_batches", "0"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(source="csv"), "mmlu.path: mmlu.source csv reads a file or folder"),
    (dict(source="synthetic", path="x.json"), r"mmlu.path is set \(x.json\) but mmlu.source synthetic reads no file"),
    (dict(source="jsonl"), "mmlu.source: 'jsonl'"),
    (dict(split="dev"), "mmlu.split: 'dev'"),
    (dict(padding_side="middle"), "mmlu.padding_side"),
    (dict(letter_tokens="space"), "mmlu.letter_tokens: 'space'"),
    (dict(every_n_validations=0), "mmlu.every_n_validations"),
])
def test_bad_settings_are_refused_before_anything_loads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MMLUEvaluation(enabled=True, **kwargs)


def test_missing_json_file_is_refused_at_setup(tiny_model_dir, tmp_path):
    mmlu = MMLUEvaluation(enabled=True, source="json", path=str(tmp_path / "five_shot_mmlu_val.json"))
    with pytest.raises(ValueError, match="mmlu.path: no such file"):
        cpu_trainer(max_steps=1, callbacks=[mmlu]).validate(module(tiny_model_dir), data(tiny_model_dir))


def test_two_evaluations_in_one_run_log_under_their_own_names(tiny_model_dir, tmp_path):
    zero = MMLUEvaluation(enabled=True, source="synthetic", split="test", shots=0, synthetic_questions=2, name="mmlu0")
    five = MMLUEvaluation(enabled=True, source="synthetic", split="test", shots=5, synthetic_questions=2, name="mmlu5")
    assert zero.state_key != five.state_key  # both states fit in one checkpoint
    trainer = cpu_trainer(limit_val_batches=1, callbacks=[zero, five],
                          logger=TensorBoardLogger(tmp_path, name="", version=""))
    metrics = trainer.validate(module(tiny_model_dir), data(tiny_model_dir), verbose=False)[0]
    assert metrics["mmlu0/accuracy"] == zero.last_results.metrics()["mmlu/accuracy"]
    assert metrics["mmlu5/accuracy"] == five.last_results.metrics()["mmlu/accuracy"]
    assert (tmp_path / "mmlu0_test.json").exists() and (tmp_path / "mmlu5_test.json").exists()
