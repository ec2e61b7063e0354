"""The run plan: every rule of the refusal table raises a ConfigError naming its key (with today's messages), the
plan is a pure function of the configuration and the trainer's facts, and it derives what the run follows."""

from __future__ import annotations

import dataclasses
import pickle

import peft
import pytest

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model import compat, rules
from lightning_qpeft.model.facts import RunConfig, TrainerFacts
from lightning_qpeft.model.fused_loss import liger_available
from lightning_qpeft.model.plan import RunPlan, resolve_plan, setting_of

FSDP = TrainerFacts(strategy="fsdp", precision="bf16-mixed", device="cuda")


def adapter(name: str, **init_args):
    return compat.load_method_config(name, base_model="checkpoints/tiny-llama", **init_args)


# rule -> a configuration that breaks it (and no rule before it); float_storage guards a row that does not exist
# yet (every method that reads the weight is refused on 4-bit bases first), so it is checked on a made-up row
EXAMPLES = {
    rules._adapter_and_path: lambda: (RunConfig(adapter=adapter("lora"), adapter_path="trained"), TrainerFacts()),
    rules._quantization_cell: lambda: (RunConfig(adapter=adapter("loha"), quantization="nf4"), TrainerFacts()),
    rules._prefix_checkpointing: lambda: (RunConfig(adapter=adapter("prefix_tuning"), quantization="nf4",
                                                    gradient_checkpointing=True), TrainerFacts()),
    rules._prompt_packing: lambda: (RunConfig(adapter=adapter("p_tuning"), quantization="int8", packing=True),
                                    TrainerFacts()),
    rules._full_fp32: lambda: (RunConfig(adapter=adapter("full"), quantization="none", dtype="bfloat16"),
                               TrainerFacts()),
    rules._ln_tuning_fp32_norms: lambda: (RunConfig(adapter=adapter("ln_tuning"), quantization="nf4",
                                                    upcast_norms=False), TrainerFacts()),
    rules._randomized_pissa: lambda: (RunConfig(adapter=peft.LoraConfig(r=4, init_lora_weights="pissa_niter_4"),
                                                quantization="none"), TrainerFacts()),
    rules._fp32_norms_without_autocast: lambda: (RunConfig(adapter=adapter("lora"), quantization="nf4"),
                                                 TrainerFacts(precision="32-true")),
    rules._decoder_loss_with_virtual_tokens: lambda: (RunConfig(adapter=adapter("prompt_tuning"), quantization="none",
                                                                loss="fused"), TrainerFacts()),
    rules._compile_dequantize_without_compile: lambda: (RunConfig(compile_dequantize=True), TrainerFacts()),
    rules._pad_multiple_with_packing: lambda: (RunConfig(adapter=adapter("lora"), packing=True, pad_to_multiple_of=64),
                                               TrainerFacts()),
    rules._fsdp_int8: lambda: (RunConfig(adapter=adapter("lora"), quantization="int8"), FSDP),
    rules._fsdp_unflattenable: lambda: (RunConfig(adapter=adapter("ia3"), quantization="nf4"), FSDP),
    rules._fsdp_float32_with_4bit: lambda: (RunConfig(adapter=adapter("lora"), quantization="nf4"),
                                            dataclasses.replace(FSDP, precision="32-true")),
    rules._fsdp_storage: lambda: (RunConfig(adapter=adapter("lora"), quantization="nf4", quant_storage="float16"),
                                  FSDP),
    rules._fsdp_clip_by_value: lambda: (RunConfig(adapter=adapter("lora"), quantization="nf4"),
                                        dataclasses.replace(FSDP, gradient_clip_val=0.3,
                                                            gradient_clip_algorithm="value")),
    rules._cuda_only_cell: lambda: (RunConfig(adapter=adapter("dora"), quantization="int8"),
                                    TrainerFacts(device="cpu")),
    rules._liger_off_cuda: lambda: (RunConfig(adapter=adapter("lora"), loss="liger"), TrainerFacts(device="cpu")),
    rules._nothing_to_train: lambda: (RunConfig(), TrainerFacts(fitting=True)),
    rules._trained_prompt_learning: lambda: (RunConfig(adapter=adapter("prompt_tuning"), adapter_path="trained",
                                                       adapter_from_path=True, quantization="none"),
                                             TrainerFacts(fitting=True)),
}


def rule_keys(rule: rules.Rule) -> list[str]:
    return [k.strip().split("=")[0] for k in rule.keys.split(",")]


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.refuses.__name__.strip("_"))
def test_every_rule_raises_a_config_error_naming_its_key(rule):
    if rule.refuses is rules._float_storage:
        row = dataclasses.replace(compat.METHODS["lora"], name="reader", reads_weight=True)
        error = rule.refuses(rules.Setting(RunConfig(quantization="nf4"), TrainerFacts(), "reader", row, "bfloat16",
                                           True))
        assert isinstance(error, ConfigError) and error.key in rule_keys(rule)
        return
    config, facts = EXAMPLES[rule.refuses]()  # a new rule needs an example here
    error = rule.refuses(setting_of(config, facts))
    assert isinstance(error, ConfigError) and isinstance(error, ValueError)
    assert error.key in rule_keys(rule), (error.key, rule.keys)
    assert error.reason and error.reason in str(error) and error.way_out in str(error)
    if rule.refuses is rules._liger_off_cuda and not liger_available():
        return  # without liger-kernel, model.loss=liger is refused as a value first
    with pytest.raises(ConfigError) as raised:  # the plan raises it, and no rule before it fires
        resolve_plan(config, facts)
    assert str(raised.value) == str(error)


def test_the_examples_cover_every_rule():
    assert set(EXAMPLES) | {rules._float_storage} == {rule.refuses for rule in rules.RULES}


@pytest.mark.parametrize("config, facts, message", [
    (RunConfig(adapter=peft.LoraConfig(r=4), quantization="none"), TrainerFacts(), None),
    (lambda: RunConfig(adapter=adapter("prefix_tuning"), quantization="nf4", gradient_checkpointing=True),
     TrainerFacts(),
     "model.adapter=prefix_tuning cannot run with model.gradient_checkpointing=true: checkpointed layers run without a "
     "key/value cache and peft passes the prefix as that cache (peft refuses it); set "
     "model.gradient_checkpointing=false"),
    (lambda: RunConfig(adapter=adapter("loha"), quantization="nf4"), TrainerFacts(),
     "model.adapter=loha cannot run with model.quantization=nf4: peft's LoHa has no 4-bit layer (it sizes its factors "
     "from the packed 4-bit weight and fails); use none or int8"),
    (RunConfig(quantization="int8"), FSDP,
     "model.quantization=int8 cannot run with trainer.strategy=fsdp: FSDP shards float tensors only and int8 weights "
     "are integers; use nf4/nf4-dq/fp4 (4-bit storage is made float) or trainer.strategy=ddp"),
    (RunConfig(packing=True, pad_to_multiple_of=8), TrainerFacts(),
     "data.pad_to_multiple_of pads batches; data.packing makes padding-free rows: set one"),
    (RunConfig(compile_dequantize=True), TrainerFacts(),
     "model.compile_dequantize: true changes what torch.compile traces; it needs model.compile: true"),
    (RunConfig(quantization="nf2"), TrainerFacts(),
     "model.quantization: unknown mode 'nf2'; choose one of none, nf4, nf4-dq, fp4, fp4-dq, int8"),
    (RunConfig(fsdp_load_on="gpu"), TrainerFacts(), "model.fsdp_load_on: 'gpu'; choose cpu or device"),
    (RunConfig(), TrainerFacts(fitting=True),
     "model.adapter: none leaves nothing to train; set model.adapter (e.g. --model.adapter "
     "configs/adapter/qlora.yaml) to fine-tune"),
], ids=["ok", "prefix", "cell", "fsdp-int8", "pad-packing", "compile-dequantize", "value", "fsdp-load-on", "nothing"])
def test_messages_are_the_ones_the_project_always_gave(config, facts, message):
    config = config() if callable(config) else config
    if message is None:
        resolve_plan(config, facts)
        return
    with pytest.raises(ConfigError) as raised:
        resolve_plan(config, facts)
    assert str(raised.value) == message


def test_a_config_error_pickles_with_its_fields():
    error = ConfigError("model.loss", "why", "what to do", head="model.loss=x cannot run with y")
    again = pickle.loads(pickle.dumps(error))
    assert (again.key, again.reason, again.way_out, again.head, str(again)) == \
        ("model.loss", "why", "what to do", "model.loss=x cannot run with y", str(error))


def test_the_plan_is_a_pure_function(monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the plan loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    config = RunConfig(adapter=adapter("qlora"), quantization="nf4", loss="fused", compile=True)
    first, second = resolve_plan(config, FSDP), resolve_plan(dataclasses.replace(config), FSDP)
    assert first == second and first is not second
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.loss = "standard"
    assert config == RunConfig(adapter=adapter("qlora"), quantization="nf4", loss="fused", compile=True)  # untouched


def test_what_the_plan_decides():
    lora = RunConfig(adapter=adapter("lora"), quantization="nf4", loss="fused", compile=True, compile_dequantize=True)
    single = resolve_plan(lora, TrainerFacts(strategy="single", precision="bf16-mixed", device="cpu"))
    assert (single.quant_storage, single.upcast_norms, single.loss, single.compile, single.compile_dequantize,
            single.load_on_cpu, single.clip_with_fsdp) == ("uint8", True, "chunked", True, True, False, False)
    fsdp = resolve_plan(lora, FSDP)
    assert (fsdp.quant_storage, fsdp.upcast_norms, fsdp.compile, fsdp.compile_dequantize, fsdp.load_on_cpu,
            fsdp.check_flattenable, fsdp.clip_with_fsdp) == ("bfloat16", False, False, False, True, True, True)
    assert any("model.compile: not applied under trainer.strategy=fsdp" in w for w in fsdp.warnings)
    assert not resolve_plan(lora, dataclasses.replace(FSDP, device="cpu")).load_on_cpu
    fp16 = resolve_plan(RunConfig(adapter=adapter("lora"), compute_dtype="float16"), TrainerFacts())
    assert any("loss collapse" in w for w in fp16.warnings)
    # per-method behaviour comes from the method's row, not from its config class
    ada = resolve_plan(RunConfig(adapter=adapter("adalora"), quantization="nf4"), TrainerFacts(fitting=True))
    assert ada.after_step is compat.METHODS["adalora"].after_step and ada.total_steps is not None
    assert resolve_plan(RunConfig(adapter=adapter("adalora")), TrainerFacts(fitting=False)).total_steps is None
    trained = RunConfig(adapter=adapter("adalora"), adapter_path="x", adapter_from_path=True)
    assert resolve_plan(trained, TrainerFacts(fitting=True)).after_step is None  # a trained one is not reallocated
    assert resolve_plan(RunConfig(adapter=adapter("full", ), quantization="none", dtype="float32")).checkpoint_holds \
        == "every weight"
    assert isinstance(single, RunPlan) and single.method == "lora" and single.row is compat.METHODS["lora"]


def test_the_fsdp_rule_names_every_row_that_does_not_flatten():
    text = next(r.text for r in rules.RULES if r.refuses is rules._fsdp_unflattenable)
    named = set(text.split("(", 1)[1].split(")", 1)[0].split(", "))
    assert named == {m.name for m in compat.METHODS.values() if not m.fsdp_flattenable}


def test_the_trainer_facts_of_a_lightning_trainer():
    from lightning.pytorch import Trainer

    from lightning_qpeft.model.facts import trainer_facts

    trainer = Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", gradient_clip_val=0.3,
                      gradient_clip_algorithm="value", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    facts = trainer_facts(trainer, fitting=True)
    assert facts == TrainerFacts(strategy="single", precision="bf16-mixed", device="cpu", world_size=1, fitting=True,
                                 gradient_clip_val=0.3, gradient_clip_algorithm="value")
    assert trainer_facts(None) == TrainerFacts(strategy="single", device="cpu", fitting=False)
