"""Greedy decoding with a static KV cache whose one-token step is replayed as a CUDA graph
(`model.generation.loop: static`).

A small model decodes at the speed of its kernel launches and Python, not of its arithmetic: one token of a
30-layer LLaMA with LoRA on every linear layer is thousands of launches. Here every tensor a decoding step
reads or writes has a fixed address (the prompt's padding mask, the next token, its position, the static cache,
the output buffer), so the whole step - forward, argmax, stop bookkeeping, the next step's mask - is captured
once per batch and replayed per token. The same step runs eagerly on the CPU (and wherever a capture fails),
which is how the tests check it against `generate`: the same tokens in float32.

transformers (`generate`) compiles decoding only for unquantized bases; this loop treats bitsandbytes layers
like any other module. Prompt-learning adapters (prefix, prompt, p-tuning) prepend virtual tokens in peft's own
forward and are decoded by `generate` instead.

Why by hand: neither transformers nor peft replays a decoding step of a quantized model as a graph.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import StaticCache

from lightning_qpeft.model.fused_loss import causal_lm_of

CHECK_EVERY = 8  # steps between host checks of "every row has stopped" (each check waits for the GPU)


def supports(model: torch.nn.Module) -> bool:
    """Whether this loop can decode `model`: no prompt-learning adapter (those need peft's forward)."""
    config = getattr(model, "active_peft_config", None)
    return not getattr(config, "is_prompt_learning", False)


class _Decoder:
    """One batch: prompt (B, T) -> greedy continuation (B, max_new_tokens), pad after each row's stop token."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, stop_ids: Sequence[int], pad_id: int) -> None:
        self.lm = causal_lm_of(model)  # peft's LoRA-style layers are inside it
        device = input_ids.device
        b, t = input_ids.shape
        self.t, self.new = t, max_new_tokens
        length = t + max_new_tokens
        self.cache = StaticCache(config=self.lm.config, max_cache_len=length)
        params = inspect.signature(self.lm.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.cache_position = "cache_position" in params  # transformers before the cache tracked its length
        self.input_ids = input_ids
        pad = attention_mask.bool()
        self.full = torch.cat([pad, torch.ones(b, max_new_tokens, dtype=torch.bool, device=device)], dim=1)  # (B, L)
        self.kv = torch.arange(length, device=device)
        self.positions = (pad.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding shifts nothing
        self.stops = torch.tensor(sorted(set(int(s) for s in stop_ids)), device=device)
        self.pad_id = pad_id
        # the step's fixed-address state
        self.tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.step_ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.step_pos = self.positions[:, -1:] + 1  # the first generated token follows the prompt
        self.step_cache_pos = torch.full((1,), t, dtype=torch.long, device=device)
        self.step_index = torch.ones(1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=device)

    @staticmethod
    def _attendable(mask: torch.Tensor) -> torch.Tensor:
        # a query row with nothing to attend to (a left-padding position) would softmax over nothing: NaN, which
        # the values of later steps would carry. Such rows attend to everything; their outputs are never read.
        return mask | ~mask.any(dim=-1, keepdim=True)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache_position: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": positions, self.cache_key: self.cache,
                                  "use_cache": True, "logits_to_keep": 1}
        if self.cache_position:
            kwargs["cache_position"] = cache_position
        return self.lm(input_ids=ids, **kwargs).logits[:, -1]  # (B, vocab)

    def _choose(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        nxt = torch.where(self.finished, self.pad_id, logits.argmax(dim=-1))  # (B,)
        self.tokens.index_copy_(1, index, nxt[:, None])
        self.finished |= torch.isin(nxt, self.stops)
        self.step_ids.copy_(nxt[:, None])

    def prefill(self) -> None:
        queries = torch.arange(self.t, device=self.kv.device)
        causal = self.kv[None, None, None, :] <= queries[None, None, :, None]  # (1, 1, T, L)
        mask = self._attendable(self.full[:, None, None, :] & causal)  # (B, 1, T, L)
        logits = self._forward(self.input_ids, mask, self.positions, queries)
        self._choose(logits, torch.zeros(1, dtype=torch.long, device=self.kv.device))
        self.step_mask.copy_(self.full[:, None, None, :] & (self.kv <= self.step_cache_pos))

    def step(self) -> None:
        """Token `step_index` from token `step_index - 1`; every read and write at a fixed address."""
        logits = self._forward(self.step_ids, self.step_mask, self.step_pos, self.step_cache_pos)
        self._choose(logits, self.step_index)
        self.step_pos.add_(1)
        self.step_cache_pos.add_(1)
        self.step_index.add_(1)
        self.step_mask.copy_(self.full[:, None, None, :] & (self.kv <= self.step_cache_pos))


def _run(decoder: _Decoder, graphs: bool) -> torch.Tensor:
    decoder.prefill()
    steps = decoder.new - 1
    run: Callable[[], None] = decoder.step
    done = 0
    if graphs and steps >= 2:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a real step, off the capture, to warm the kernels and allocator up
            decoder.step()
        torch.cuda.current_stream().wait_stream(side)
        done = 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            decoder.step()
        run = graph.replay
    for i in range(done, steps):
        if i % CHECK_EVERY == 0 and bool(decoder.finished.all()):
            break
        run()
    return decoder.tokens


class StaticGreedy:
    """Greedy decoding with a static cache, replayed as CUDA graphs on CUDA devices.

    On the first batch of a process a graph's tokens are compared with the same batch decoded eagerly; where they
    differ, or a capture fails, graphs are turned off for the process with a warning and decoding goes on eagerly.
    """

    def __init__(self) -> None:
        self.graphs: Optional[bool] = None  # None: not yet checked in this process

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                 forward_context: Optional[Callable[[], Any]] = None) -> torch.Tensor:
        def decode(graphs: bool) -> torch.Tensor:
            with (forward_context or contextlib.nullcontext)():
                return _run(_Decoder(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id), graphs)

        if input_ids.device.type != "cuda" or self.graphs is False:
            return decode(False)
        try:
            tokens = decode(True)
        except Exception as e:  # a capture refused by some layer's kernel: eager from now on
            self.graphs = False
            rank_zero_warn(f"model.generation.loop=static: CUDA graph capture failed ({type(e).__name__}: {e}); "
                           "decoding eagerly with the static cache")
            return decode(False)
        if self.graphs is None:
            eager = decode(False)
            self.graphs = bool(torch.equal(tokens, eager))
            if not self.graphs:
                rank_zero_warn("model.generation.loop=static: the CUDA graph's tokens differ from eager decoding "
                               "on the first batch; decoding eagerly with the static cache")
                return eager
        return tokens
