"""Decoding: the settings (`model.generation.*`) and one batch of greedy or sampled continuations.

Config keys (`model.generation.*`): max_new_tokens, do_sample, temperature, top_p, num_beams, cache, loop.

An answer ends at the first stop token: the tokenizer's EOS or the chat template's end-of-turn token
(`core.tokens.stop_token_ids`: SmolLM2's `<|im_end|>`). Decoding runs under the trainer's precision context, as
the training step does: with bf16-mixed the float32 norm weights and the bf16 weights meet inside autocast,
never in a bare matmul of two dtypes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model.static_decoding import StaticGreedy, supports

CACHES = ("dynamic", "static")
LOOPS = ("generate", "static")
_STATIC = StaticGreedy()  # per process: whether CUDA graphs decode as eager decoding does is checked once


@dataclass
class Generation:
    """Decoding settings (greedy by default).

    Attributes:
        max_new_tokens: most tokens generated per prompt.
        do_sample: sample instead of greedy/beam decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_beams: beam search width (1: none).
        cache: the KV cache: `dynamic` (grows with each token) or `static` (allocated once for prompt +
            max_new_tokens; transformers then compiles the decoding step on CUDA, for unquantized bases only,
            since it does not compile bitsandbytes layers). The same tokens either way, up to rounding.
        loop: `generate` (transformers' decoding loop) or `static` (greedy only: a static cache and the
            one-token step replayed as a CUDA graph on CUDA, quantized bases included;
            `model/static_decoding.py`). Prompt-learning adapters always decode with `generate`.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    cache: Literal["dynamic", "static"] = "dynamic"
    loop: Literal["generate", "static"] = "generate"

    def __post_init__(self) -> None:
        if self.cache not in CACHES:
            raise ConfigError("model.generation.cache", f"{self.cache!r} is not one of {', '.join(CACHES)}")
        if self.loop not in LOOPS:
            raise ConfigError("model.generation.loop", f"{self.loop!r} is not one of {', '.join(LOOPS)}")
        if self.loop == "static" and (self.do_sample or self.num_beams != 1):
            raise ConfigError("model.generation.loop", "it cannot run with model.generation.do_sample=true or "
                              "num_beams > 1", "use loop=generate",
                              head="model.generation.loop=static decodes greedily")

    def kwargs(self) -> dict[str, Any]:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams)
        if self.cache != "dynamic":
            kw["cache_implementation"] = self.cache
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: Generation,
             stop_ids: Sequence[int], pad_id: int, forward_context: Optional[Callable[[], Any]] = None,
             **overrides: Any) -> torch.Tensor:
    """Continuations only, (B, new_tokens), for left-padded prompts (B, T); rows that stopped early are padded
    with `pad_id` after their stop token.

    Args:
        model: a causal LM (peft-wrapped or not).
        input_ids: left-padded prompts (B, T).
        attention_mask: (B, T), 0 on the padding.
        settings: the decoding settings.
        stop_ids: tokens that end an answer (EOS, end-of-turn); at least one.
        pad_id: the id finished rows are filled with.
        forward_context: the trainer's precision context (autocast under bf16-mixed); none: as the weights are.
        **overrides: `generate` keyword arguments that replace the settings'.
    """
    if not stop_ids:
        raise ValueError("generation: no stop token (the tokenizer has no EOS and no chat end-of-turn token)")
    was_training = model.training
    model.eval()
    try:
        if settings.loop == "static" and supports(model) and not overrides:
            return _STATIC(model, input_ids, attention_mask, settings.max_new_tokens, stop_ids, pad_id,
                           forward_context)
        with (forward_context or contextlib.nullcontext)():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                 eos_token_id=list(stop_ids), pad_token_id=pad_id,
                                 **{**settings.kwargs(), **overrides})
    finally:
        model.train(was_training)
    return out[:, input_ids.shape[1]:]
