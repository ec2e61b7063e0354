"""Adapters: peft's own config classes, attached to a prepared base model.

Config key: `model.adapter`, a peft config given as `class_path`/`init_args` (or a YAML file holding one,
e.g. `--model.adapter configs/adapter/lora.yaml`), or `lightning_qpeft.model.adapters.FullFineTuning`.
peft's dataclasses are used as they are: their fields, defaults and validation are peft's, and
LightningCLI/jsonargparse turns them into `--help` and type checks.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Optional, Union

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn


@dataclass
class FullFineTuning:
    """The baseline: every floating-point weight of the base trains (an unquantized base only).

    Attributes:
        train_embeddings: also train the input embeddings and the LM head.
    """

    train_embeddings: bool = True


AdapterConfig = Union[PeftConfig, FullFineTuning]


def load_adapter_config(path: str) -> PeftConfig:
    """The config of an exported adapter folder (its adapter_config.json), naming the key on failure."""
    try:
        return PeftConfig.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"model.adapter_path: {path!r} is not a peft adapter folder ({e})") from None


def method_name(adapter: Optional[AdapterConfig]) -> str:
    """A short name for logs and tables: peft's type, refined for LoRA variants (DoRA, rsLoRA, PiSSA...)."""
    if adapter is None:
        return "none"
    if isinstance(adapter, FullFineTuning):
        return "full"
    name = str(getattr(adapter.peft_type, "value", adapter.peft_type)).lower()
    if isinstance(adapter, LoraConfig):
        if adapter.use_dora:
            return "dora"
        if adapter.use_rslora:
            return "rslora"
        init = adapter.init_lora_weights
        if isinstance(init, str):
            return init.split("_")[0].lower()  # pissa, olora, loftq, gaussian, eva, corda
    return name


def with_causal_lm_task(adapter: PeftConfig) -> PeftConfig:
    """The config with `task_type=CAUSAL_LM` (prompt-learning methods and PeftModelForCausalLM need it)."""
    if adapter.task_type is None:
        return dataclasses.replace(adapter, task_type="CAUSAL_LM")
    return adapter


def attach_adapter(model: nn.Module, adapter: Optional[AdapterConfig], adapter_path: Optional[str] = None) -> nn.Module:
    """Wrap a frozen base with the adapter (new, or trained from `adapter_path`); for full fine-tuning,
    unfreeze the base instead; with neither, return the bare base (evaluation of the base model)."""
    if adapter_path is not None:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    if adapter is None:
        return model
    if isinstance(adapter, FullFineTuning):
        for name, p in model.named_parameters():
            is_embedding = "embed_tokens" in name or "lm_head" in name
            p.requires_grad_(p.is_floating_point() and (adapter.train_embeddings or not is_embedding))
        return model
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
