"""Adapters: peft's own config classes, attached to a prepared base model.

Config key: `model.adapter`, a peft config given as `class_path`/`init_args` (or a YAML file holding one,
e.g. `--model.adapter configs/adapter/lora.yaml`), or `lightning_qpeft.model.adapters.FullFineTuning`.
peft's dataclasses are used as they are: their fields, defaults and validation are peft's, and
LightningCLI/jsonargparse turns them into `--help` and type checks. Which method may meet which quantized
base is decided in `compat.py`; this module only builds.

Two fields peft demands when a config is constructed are decided by the run instead (`complete_run_fields`,
applied by the CLI before it instantiates the config): a text-initialised prompt's tokenizer
(`tokenizer_name_or_path`, from `model.base_model`) and AdaLoRA's `total_step` (from the trainer, set again
in `QPeftModule.configure_model`).

Two thin additions to peft: `FullFineTuning` (the baseline) and `LoftQLoraConfig` (a `LoraConfig` whose A, B
are initialised by peft's `replace_lora_weights_loftq` against the 4-bit base; peft's own
`init_lora_weights="loftq"` path rewrites the base weights instead and needs an unquantized base and scipy).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickle
from dataclasses import dataclass
from typing import Any, Optional, Union

from peft import AdaLoraConfig, LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from torch import nn

from lightning_qpeft.core.errors import ConfigError


@dataclass
class FullFineTuning:
    """The baseline: every floating-point weight of the base trains (an unquantized base only).

    Attributes:
        train_embeddings: also train the input embeddings and the LM head.
    """

    train_embeddings: bool = True


@dataclass
class LoftQLoraConfig(LoraConfig):
    """LoRA initialised with LoftQ on a 4-bit base: A, B from an SVD of W - dequant(Q(W)).

    The fields are `peft.LoraConfig`'s (`init_lora_weights` is ignored: LoftQ decides A and B). The original
    weights are read from the base model folder's safetensors; the base itself stays as loaded, so the
    exported adapter is a plain LoRA adapter of that quantized base. peft computes the SVD on CUDA.
    """


AdapterConfig = Union[PeftConfig, FullFineTuning]

# written beside an exported adapter: the base, quantization and method it was trained with (read by merge)
TRAINING_FILE = "qpeft_training.json"


def load_adapter_config(path: str) -> PeftConfig:
    """The config of an exported adapter folder (its adapter_config.json), naming the key on failure."""
    try:
        return PeftConfig.from_pretrained(path)
    except Exception as e:
        raise ConfigError("model.adapter_path", f"{path!r} is not a peft adapter folder ({e})") from None


def method_name(adapter: Optional[AdapterConfig]) -> str:
    """The method's name in the compatibility table (`compat.METHODS`): peft's type, refined for the LoRA
    variants (dora, rslora, pissa, loftq) and text-initialised prompt tuning."""
    if adapter is None:
        return "none"
    if isinstance(adapter, FullFineTuning):
        return "full"
    if isinstance(adapter, LoftQLoraConfig):
        return "loftq"
    name = str(getattr(adapter.peft_type, "value", adapter.peft_type)).lower()
    if isinstance(adapter, LoraConfig) and not isinstance(adapter, AdaLoraConfig):
        if adapter.use_dora:
            return "dora"
        init = adapter.init_lora_weights
        if isinstance(init, str) and init != "gaussian":
            return init.split("_")[0].lower()  # pissa (pissa_niter_K too), olora, loftq, eva, corda, ...
        if adapter.use_rslora:
            return "rslora"
    if isinstance(adapter, PromptTuningConfig) and _value(adapter.prompt_tuning_init) == "TEXT":
        return "prompt_tuning_text"
    return name


def _value(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def with_causal_lm_task(adapter: PeftConfig) -> PeftConfig:
    """The config with `task_type=CAUSAL_LM` (prompt-learning methods and PeftModelForCausalLM need it)."""
    if adapter.task_type is None:
        return dataclasses.replace(adapter, task_type="CAUSAL_LM")
    return adapter


def complete_run_fields(adapter: Any, base_model: str) -> None:
    """Fill, in place, the config fields peft requires at construction that the run decides.

    `adapter` is the unparsed form jsonargparse holds before instantiating (`class_path` + `init_args`):
    - a TEXT-initialised `PromptTuningConfig` without `tokenizer_name_or_path` gets `base_model` (the data
      is tokenized with that tokenizer too);
    - an `AdaLoraConfig` without `total_step` gets the smallest value peft accepts; `QPeftModule` replaces
      it with `trainer.estimated_stepping_batches` before the adapter is built.
    """
    class_path = getattr(adapter, "class_path", None)
    args = getattr(adapter, "init_args", None)
    if class_path is None or args is None:
        return
    cls = class_path.rsplit(".", 1)[-1]
    if cls == "PromptTuningConfig" and _value(getattr(args, "prompt_tuning_init", None)) == "TEXT":
        if not getattr(args, "tokenizer_name_or_path", None):
            args.tokenizer_name_or_path = base_model
    if cls == "AdaLoraConfig" and not getattr(args, "total_step", None):
        args.total_step = (getattr(args, "tinit", 0) or 0) + (getattr(args, "tfinal", 0) or 0) + 1


def load_adapter_yaml(path: str | os.PathLike, base_model: str = "checkpoints/tiny-llama", **init_args: Any) -> Any:
    """An adapter YAML (`configs/adapter/*.yaml`) parsed and instantiated as `--model.adapter FILE` does.

    Args:
        path: the YAML (class_path + init_args).
        base_model: fills the run-decided fields (`complete_run_fields`).
        **init_args: fields overriding the YAML's.
    """
    import yaml
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--adapter", type=Optional[AdapterConfig])
    with open(path) as f:
        cfg = parser.parse_object({"adapter": yaml.safe_load(f)})
    for key, value in init_args.items():
        setattr(cfg.adapter.init_args, key, value)
    complete_run_fields(cfg.adapter, base_model)
    return parser.instantiate_classes(cfg).adapter


def with_total_steps(adapter: AdaLoraConfig, total_steps: int) -> AdaLoraConfig:
    """AdaLoRA's config with the run's optimizer-step count; a clear error when its schedule does not fit."""
    if adapter.tinit >= total_steps - adapter.tfinal:
        raise ConfigError(
            "model.adapter.init_args.tinit",
            f"AdaLoRA's rank schedule needs tinit < total steps - tfinal, and this run has {total_steps} optimizer "
            "steps (trainer.max_steps / max_epochs); lower tinit and tfinal or train longer",
            head=f"model.adapter.init_args.tinit={adapter.tinit} and tfinal={adapter.tfinal}",
        )
    return dataclasses.replace(adapter, total_step=int(total_steps))


def attach_adapter(
    model: nn.Module,
    adapter: Optional[AdapterConfig],
    adapter_path: Optional[str] = None,
    base_path: Optional[str] = None,
) -> nn.Module:
    """Wrap a frozen base with the adapter (new, or trained from `adapter_path`); for full fine-tuning,
    unfreeze the base instead; with neither, return the bare base (evaluation of the base model).

    Args:
        model: the prepared (frozen) base.
        adapter: the adapter config.
        adapter_path: a trained adapter folder to load instead (trainable).
        base_path: the base model's folder (LoftQ reads the unquantized weights from its safetensors);
            None for a hub id (peft then looks in the local hub cache).
    """
    if adapter_path is not None:
        prompt_learning = load_adapter_config(adapter_path).is_prompt_learning
        # peft refuses to load prompt-learning adapters as trainable ("Cannot set a prompt learning adapter to
        # trainable when loading pretrained adapter"), yet leaves their embedding requiring grad: they are
        # frozen below, so that they load for evaluation and prediction only (QPeftModule says so if asked to
        # train them). peft reads adapter_model.safetensors, or a legacy adapter_model.bin with weights_only.
        try:
            peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=not prompt_learning)
        except pickle.UnpicklingError as e:
            raise ConfigError("model.adapter_path", f"{adapter_path!r} holds a pickle with more than tensors "
                              f"(refused: loading it could run code): {str(e).strip().splitlines()[-1]}") from None
        if prompt_learning:
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return peft_model
    if adapter is None:
        return model
    if isinstance(adapter, FullFineTuning):
        for name, p in model.named_parameters():
            is_embedding = "embed_tokens" in name or "lm_head" in name
            p.requires_grad_(p.is_floating_point() and (adapter.train_embeddings or not is_embedding))
        return model
    if isinstance(adapter, LoftQLoraConfig) or method_name(adapter) == "loftq":
        from peft import replace_lora_weights_loftq

        fields = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        lora = LoraConfig(**{**fields, "init_lora_weights": True, "loftq_config": {}})
        peft_model = get_peft_model(model, with_causal_lm_task(lora))
        replace_lora_weights_loftq(peft_model, model_path=base_path)
        return peft_model
    return get_peft_model(model, with_causal_lm_task(adapter))


def adapter_to_dict(adapter: Optional[AdapterConfig]) -> dict[str, Any]:
    """Plain-data form of the config (for hparams and checkpoints that load with weights_only=True)."""
    if adapter is None:
        return {"method": "none"}
    raw = dataclasses.asdict(adapter) if isinstance(adapter, FullFineTuning) else adapter.to_dict()
    raw["method"] = method_name(adapter)
    return _plain(raw)


def _plain(x: Any) -> Any:
    if isinstance(x, enum.Enum):  # before str: peft's enums are str subclasses that pickle as classes
        return _plain(x.value)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in x]
        return sorted(items, key=str) if isinstance(x, (set, frozenset)) else items
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def is_peft(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)
