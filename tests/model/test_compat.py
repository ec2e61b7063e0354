"""The compatibility table refuses what it says, before any weight loads, naming both keys; its refusals are
needed (peft really fails or computes the wrong function there); README's table is the generated one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest
import torch

from lightning_qpeft.cli import QPeftCLI
from lightning_qpeft.model import compat, rules
from lightning_qpeft.model.adapters import attach_adapter
from lightning_qpeft.model.facts import RunConfig, TrainerFacts
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.module import QPeftModule
from lightning_qpeft.model.plan import resolve_plan

ROOT = Path(__file__).resolve().parents[2]


def cells_with(status: compat.Status) -> list:
    return [pytest.param(m.name, q, id=f"{m.name}-{q}") for m, q, c in compat.cells() if c.status is status]


REFUSED = cells_with(compat.Status.REFUSED)
CUDA = cells_with(compat.Status.CUDA)


def config(method: str, **init_args):
    return compat.load_method_config(method, base_model="checkpoints/tiny-llama", **init_args)


def check(adapter, quantization: str, precision: str = "", device=None, **keys):
    """The plan of a configuration (the table's refusals raise)."""
    return resolve_plan(RunConfig(adapter=adapter, quantization=quantization, **keys),
                        TrainerFacts(precision=precision, device=device))


def shown_name(method: str) -> str:
    row = compat.METHODS[method]
    return row.alias_of or row.name


@pytest.mark.parametrize("method, quantization", REFUSED)
def test_refused_cell_fails_in_init_naming_both_keys(method, quantization, tmp_path):
    missing = str(tmp_path / "no-model-here")  # any attempt to load would fail differently
    with pytest.raises(ValueError) as e:
        QPeftModule(missing, quantization=quantization, adapter=config(method))
    message = str(e.value)
    assert message.startswith(f"model.adapter={shown_name(method)} cannot run with model.quantization={quantization}: ")
    assert compat.METHODS[method].cell(quantization).reason in message
    assert "; use " in message  # the way out


@pytest.mark.parametrize("method, quantization", CUDA)
def test_cuda_cell_passes_init_and_is_refused_on_cpu_before_loading(method, quantization, tmp_path):
    module = QPeftModule(str(tmp_path / "no-model-here"), quantization=quantization, adapter=config(method))
    with pytest.raises(ValueError, match=rf"model.adapter={method} cannot run with model.quantization={quantization} "
                                         r"on cpu: .*train on a GPU \(trainer.accelerator=gpu\)"):
        module.configure_model()
    check(config(method), quantization, device="cuda")  # allowed there


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter="prefix_tuning", quantization="nf4", gradient_checkpointing=True),
     "model.adapter=prefix_tuning cannot run with model.gradient_checkpointing=true"),
    (dict(adapter="full", quantization="none", dtype="bfloat16"),
     "model.adapter=full cannot run with model.dtype=bfloat16: every weight trains"),
    (dict(adapter="full", quantization="none"), "model.adapter=full cannot run with model.dtype=auto"),
    (dict(adapter="ln_tuning", quantization="nf4", upcast_norms=False, compute_dtype="bfloat16"),
     "model.adapter=ln_tuning cannot run with model.upcast_norms=false: the trained norm weights would stay in "
     "bfloat16"),
    (dict(adapter="p_tuning", quantization="int8", packing=True),
     "model.adapter=p_tuning cannot run with data.packing=true"),
])
def test_rules_on_other_keys(kwargs, message):
    kwargs = dict(kwargs)
    adapter = config(kwargs.pop("adapter"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(adapter, **kwargs)


def test_float_storage_rule_refuses_methods_that_read_the_weight():
    # no supported 4-bit cell reads the weight today (pissa, loftq and full are refused on 4-bit); the rule
    # guards the next row that would: FSDP's float storage makes packed bytes look like weights
    row = dataclasses.replace(compat.METHODS["lora"], name="reader", reads_weight=True)
    setting = rules.Setting(RunConfig(quantization="nf4"), TrainerFacts(), "reader", row, "bfloat16", True)
    assert "model.adapter=reader cannot run with model.quant_storage=bfloat16" in str(rules._float_storage(setting))
    assert rules._float_storage(dataclasses.replace(setting, quant_storage="auto")) is None


def test_randomized_pissa_is_refused():
    # jsonargparse already rejects pissa_niter_K from the CLI (peft's type hint is a Literal); Python users can
    # still build one
    adapter = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa_niter_4")
    with pytest.raises(ValueError, match="model.adapter=pissa cannot use "
                                         "model.adapter.init_args.init_lora_weights=pissa_niter_4"):
        check(adapter, "none")


def test_rules_pass_where_they_should():
    check(config("prefix_tuning"), "nf4", gradient_checkpointing=False)
    check(config("lora"), "nf4", gradient_checkpointing=True, quant_storage="bfloat16")
    check(config("full"), "none", dtype="float32")
    check(config("ln_tuning"), "nf4", upcast_norms=False, compute_dtype="float32")
    check(config("ln_tuning"), "none", upcast_norms=True, dtype="bfloat16")
    check(config("pissa"), "none")
    check(config("lora"), "nf4", packing=True)


def test_unknown_method_is_refused_on_quantized_bases_and_warned_on_unquantized():
    fourier = peft.FourierFTConfig(target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="model.adapter=fourierft cannot run with model.quantization=nf4: "
                                         "fourierft has no row in the compatibility table"):
        check(fourier, "nf4")
    assert any("not in the compatibility table" in w for w in check(fourier, "none").warnings)


def test_every_yaml_is_a_row_and_every_row_has_a_yaml():
    yamls = {p.stem for p in (ROOT / "configs" / "adapter").glob("*.yaml")}
    assert yamls == set(compat.METHODS)
    for method in compat.METHODS.values():
        adapter = config(method.name)
        assert f"class_path: {method.config_class}" in method.yaml.read_text()
        assert compat.lookup(adapter)[0] == (method.alias_of or method.name)


# The refusals are needed: forced through peft (bypassing the check), these cells fail or compute another
# function. (Measured once per kind of failure; the full matrix is in shared/reference/peft-quant-matrix.md.)
@pytest.mark.parametrize("method, quantization", [("loha", "nf4"), ("lokr", "fp4"), ("hra", "nf4-dq"),
                                                  ("pissa", "int8")])
def test_refused_cell_really_fails_in_peft(method, quantization, tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantization, compute_dtype="float32")
    adapter = compat.load_method_config(method, base_model=tiny_model_dir)
    with pytest.raises((RuntimeError, TypeError)):
        model = attach_adapter(base, adapter)
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_hra_on_int8_trains_but_computes_another_function(tiny_model_dir):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = load_base_model(tiny_model_dir, "int8", compute_dtype="float32").eval()
    with torch.no_grad():
        bare = base(input_ids=ids).logits
    model = attach_adapter(base, compat.load_method_config("hra", base_model=tiny_model_dir)).eval()
    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
    assert (wrapped - bare).abs().max() > 1.0  # an identity-at-init method, off by whole logits


def test_full_fine_tuning_on_a_quantized_base_would_train_no_linear_weight(tiny_model_dir):
    base = load_base_model(tiny_model_dir, "nf4", compute_dtype="float32")
    for p in base.parameters():
        p.requires_grad_(False)
    model = attach_adapter(base, config("full"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("proj" in n for n in trainable)


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert compat.MARKERS[0] in readme, "README.md has no generated compatibility table"
    assert compat.replace_section(readme) == readme, (
        "README's table is stale: run python -m lightning_qpeft.model.compat --write README.md")


def test_markdown_lists_every_method_mode_and_reason():
    text = compat.markdown()
    for method, quantization, cell in compat.cells():
        assert f"[{method.name}](configs/adapter/{method.name}.yaml)" in text
        assert cell.reason in text
    assert "| method | trains | " + " | ".join(compat.QUANT_COLUMNS) in text
    for rule in compat.RULES:
        assert rule.keys in text


def test_fit_with_a_refused_combination_exits_before_training(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="model.adapter=loha cannot run with model.quantization=nf4: "
                                         "peft's LoHa has no 4-bit layer.*; use none or int8"):
        QPeftCLI(args=["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                       "--model.adapter", str(ROOT / "configs" / "adapter" / "loha.yaml"),
                       "--model.quantization", "nf4", "--trainer.default_root_dir", str(tmp_path)])
    assert not (tmp_path / "lightning_logs").exists()


def test_cli_fills_the_run_decided_fields(tiny_model_dir):
    def adapter(name):
        cli = QPeftCLI(args=["--config", str(ROOT / "configs" / "tiny.yaml"), "--model.base_model", tiny_model_dir,
                             "--model.quantization", "none", "--model.adapter",
                             str(ROOT / "configs" / "adapter" / f"{name}.yaml"), "--trainer.logger", "false"],
                       run=False)
        return cli.model.adapter

    assert adapter("prompt_tuning_text").tokenizer_name_or_path == tiny_model_dir
    ada = adapter("adalora")
    assert ada.total_step == ada.tinit + ada.tfinal + 1  # a placeholder; configure_model sets the trainer's
