"""`python -m lightning_qpeft merge`: the merged plain model computes what the adapter computed.

Tolerances (float32 on the tiny LLaMA, adapters given random non-zero weights so that merging matters):
- merged model vs the unmerged adapter on the same freshly dequantized base: max |Δlogit| < 1e-4 for every
  mergeable method (measured <= ~5e-6);
- merged model vs the trained model on its quantized base: < 1e-4 on 4-bit and unquantized bases (measured
  3e-6: the 4-bit layers compute with exactly the dequantized weights); int8 layers also quantize the
  activations, so there the trained model differs from any float model (measured 0.11) and only the first
  check applies;
- `--quantization none` merges into the original weights instead: it differs from the trained nf4 model by
  the base's quantization error (measured 1.3 on this random model).
In bfloat16 the merged weights round: measured 0.04 (unquantized) and 0.44 (nf4) on this tiny model, whose
random logits are large; not asserted.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lightning_qpeft.callbacks.adapter_export import export_model, training_info
from lightning_qpeft.merge import main as merge_main
from lightning_qpeft.merge import dequantized_base, merge
from lightning_qpeft.model import compat
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.module import QPeftModule

ATOL = 1e-4
TINY_OVERRIDES = {"adalora": dict(tinit=0, tfinal=1, deltaT=1, total_step=3)}


def merge_mode(method: compat.Method) -> str:
    """A quantized mode the method trains on here (nf4, else int8), else none."""
    ok = [q for q in ("nf4", "int8", "none") if method.cell(q).status is compat.Status.OK]
    return ok[0]


CPU_ROWS = [m for m in compat.METHODS.values()
            if any(m.cell(q).status is compat.Status.OK for q in compat.QUANT_COLUMNS)]
MERGEABLE = [pytest.param(m.name, merge_mode(m), id=f"{m.name}-{merge_mode(m)}") for m in CPU_ROWS
             if m.merge_cell(merge_mode(m)).status is compat.Status.OK]
NOT_MERGEABLE = [m.name for m in compat.METHODS.values() if m.merge is not None]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def trained_adapter(method: str, quantization: str, base_model: str, folder) -> tuple[QPeftModule, torch.Tensor]:
    """An exported adapter with random non-zero weights (a trained one, as far as merging is concerned)."""
    adapter = compat.load_method_config(method, base_model=base_model, **TINY_OVERRIDES.get(method, {}))
    module = QPeftModule(base_model, quantization=quantization, compute_dtype="float32", adapter=adapter)
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    export_model(module.model, folder, training_info(module))
    return module.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method, quantization", MERGEABLE)
def test_merged_model_computes_what_the_adapter_computed(method, quantization, tiny_model_dir, tmp_path, ids):
    module = trained_adapter(method, quantization, tiny_model_dir, tmp_path / "adapter")
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())

    # the same adapter, unmerged, on the same freshly dequantized base
    base = dequantized_base(tiny_model_dir, quantization, "float32")
    unmerged = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(merged, ids), logits(unmerged, ids), rtol=0, atol=ATOL)
    if quantization != "int8":  # int8 layers quantize activations too: no float model equals them
        torch.testing.assert_close(logits(merged, ids), logits(module.model, ids), rtol=0, atol=ATOL)


def test_merge_command_writes_a_plain_model_folder(tiny_model_dir, tmp_path, ids):
    trained_adapter("qlora", "nf4-dq", tiny_model_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")  # the base is elsewhere now
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    merge_main(["--adapter_path", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"),
                "--base_model", tiny_model_dir, "--dtype", "bfloat16"])
    out = tmp_path / "merged"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").exists()
    provenance = json.loads((out / "qpeft_merge.json").read_text())
    assert provenance["dequantized_from"] == "nf4-dq" and provenance["method"] == "lora"
    with safe_open(out / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert weight.dtype == torch.bfloat16 and weight.shape == (64, 64)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(ids[:1], max_new_tokens=2, do_sample=False).shape[1] >= ids.shape[1] + 1


def test_merging_into_the_original_weights_differs_by_the_quantization_error(tiny_model_dir, tmp_path, ids):
    module = trained_adapter("lora", "nf4", tiny_model_dir, tmp_path / "adapter")
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), quantization="none", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    original = load_base_model(tiny_model_dir, "none", dtype="float32")
    unmerged = peft.PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(merged, ids), logits(unmerged, ids), rtol=0, atol=ATOL)
    assert (logits(merged, ids) - logits(module.model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("method", [m for m in NOT_MERGEABLE if m != "full"])
def test_prompt_learning_adapters_are_refused_before_loading(method, tiny_model_dir, tmp_path):
    trained_adapter(method, "none", tiny_model_dir, tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"holds a {method} adapter, which cannot be merged: a prompt-learning "
                                         "adapter adds virtual tokens"):
        merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), base_model=str(tmp_path / "no-model-here"))
    assert not (tmp_path / "merged").exists()


def test_full_fine_tuning_export_is_refused(tiny_model_dir, tmp_path):
    module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32", dtype="float32",
                         adapter=compat.load_method_config("full"))
    module.configure_model()
    export_model(module.model, tmp_path / "full")
    with pytest.raises(ValueError, match="is a complete model folder \\(full fine-tuning\\): a full fine-tuning "
                                         "export is already a complete model folder"):
        merge(str(tmp_path / "full"), str(tmp_path / "merged"))


def test_merge_is_a_registered_command():
    from lightning_qpeft.__main__ import COMMANDS

    assert COMMANDS["merge"][0] == "lightning_qpeft.merge:main"
    with pytest.raises(SystemExit) as e:
        merge_main(["--help"])
    assert e.value.code == 0
