"""Parameter counts: of a loaded (possibly quantized) model, and of an adapter on Llama-2-7B's shapes.

`count_parameters` is what a run logs as `params/trainable` and `params/total`: a packed 4-bit weight counts
as the weights it stands for (bitsandbytes packs two 4-bit values per byte, into a (n/2, 1) tensor), so the
totals of one adapter on nf4, int8 and an unquantized base are equal.

`llama2_7b_counts` builds Llama-2-7B's shapes on the meta device (no memory, no download) and attaches an
adapter config to it: the counts quoted in `configs/adapter/*.yaml` come from here
(`python -m lightning_qpeft.model.counting` prints them).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import nn

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; packed 4-bit weights counted as the weights they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = math.prod(p.quant_state.shape) if p.quant_state is not None else n * 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def llama2_7b_counts(adapter, exact: bool = False) -> tuple[int, int]:
    """(trainable, total) parameters of `adapter` (a peft config or FullFineTuning) on Llama-2-7B's shapes.

    Every count is affine in the number of (identical) blocks, c(L) = c0 + L·c1, so by default it is taken
    on 1- and 2-block models and extrapolated to 32 (peft builds some adapters, BOFT's butterfly
    permutations for one, slowly even on the meta device); `exact` builds all 32 blocks.
    Initialisations that read the weights (PiSSA's SVD, LoftQ) cannot run on the meta device; they do not
    change any shape, so the count uses LoRA's default initialisation.
    """
    layers = LLAMA2_7B["num_hidden_layers"]
    if exact:
        return _meta_counts(adapter, layers)
    one, two = _meta_counts(adapter, 1), _meta_counts(adapter, 2)
    return tuple(a + (b - a) * (layers - 1) for a, b in zip(one, two))


def _meta_counts(adapter, num_hidden_layers: int) -> tuple[int, int]:
    adapter = copy.deepcopy(adapter)  # peft fills prompt-learning fields (num_layers, token_dim) in place
    from peft import LoraConfig, PromptTuningConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_qpeft.model.adapters import LoftQLoraConfig, attach_adapter

    if type(adapter) in (LoraConfig, LoftQLoraConfig):
        adapter = LoraConfig(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(LoraConfig)
                                if f.init and f.name not in ("init_lora_weights", "loftq_config")})
    if isinstance(adapter, PromptTuningConfig):
        adapter = dataclasses.replace(adapter, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                                      tokenizer_name_or_path=None)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": num_hidden_layers}))
    for p in model.parameters():
        p.requires_grad_(False)
    return count_parameters(attach_adapter(model, adapter))


def params_line(trainable: int, total: int) -> str:
    """The comment line quoted in configs/adapter/*.yaml (checked against `llama2_7b_counts` by a test)."""
    return f"# Llama-2-7B: {trainable:,} trainable parameters ({100 * trainable / total:.3g} % of {total:,})."


def main(argv: Optional[list[str]] = None) -> None:
    from lightning_qpeft.model.compat import METHODS, load_method_config

    for method in METHODS.values():
        print(f"{method.name:20s} {params_line(*llama2_7b_counts(load_method_config(method)))}")


if __name__ == "__main__":
    main()
