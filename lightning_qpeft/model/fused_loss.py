"""The causal-LM loss without the (tokens x vocab) fp32 logits: LM head + cross-entropy at supervised positions.

Config key: `model.loss`
    standard:  the model's own forward with `labels` (transformers: logits for every position, upcast to fp32)
    fused:     `liger` on a CUDA device when liger-kernel is installed, `chunked` otherwise
    chunked:   our chunked linear + cross-entropy (below); any device
    liger:     liger-kernel's fused linear + cross-entropy (Triton: CUDA only; `pip install liger-kernel`)

What the fused paths save. transformers computes logits at every position, `(B, T, V)` in bf16, then casts them
to fp32 for the loss and keeps the fp32 log-softmax for backward: on a 16 x 200-token Alpaca batch with LLaMA's
32k vocabulary that is ~1.2 GiB of logits and their gradient, and as many FLOPs for the LM head at prompt
positions as at answer positions, although the prompt is masked (-100) from the loss. Here the hidden states are
gathered at the supervised positions first (`supervised_hidden`; on Alpaca about half of the tokens), then the
LM head and the cross-entropy run chunk by chunk, and the gradient w.r.t. the hidden states is computed in the
same pass, so at most one chunk of logits exists at a time.

Why hand-written: liger-kernel's `LigerFusedLinearCrossEntropyLoss` does this with Triton kernels, which run on
CUDA only; CPUs (this project's CI) and other devices need a torch implementation, and the two are tested
against each other and against the standard loss (tests/model/test_fused_loss.py). The result is the standard
loss: the mean over supervised tokens of -log softmax(h W^T + b)[label], within bf16 rounding.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tokens import IGNORE_INDEX

LOSSES = ("standard", "fused", "chunked", "liger")
# rows of logits computed at once: 2048 x 32k fp32 = 256 MiB; larger chunks gain nothing measurable
CHUNK_ROWS = 2048


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_loss_name(name: str) -> None:
    if name not in LOSSES:
        raise ConfigError("model.loss", f"unknown loss {name!r}", f"choose one of {', '.join(LOSSES)}")
    if name == "liger" and not liger_available():
        raise ConfigError("model.loss", "liger needs liger-kernel (pip install liger-kernel, or "
                          "pip install 'lightning_qpeft[fast]')", "or use model.loss: fused (falls back to chunked)")


def loss_implementation(name: str, device_type: Optional[str]) -> str:
    """What `model.loss` runs as on a device: `fused` becomes `liger` on CUDA with liger-kernel, else `chunked`."""
    if name == "fused":
        return "liger" if device_type == "cuda" and liger_available() else "chunked"
    return name


def resolve_loss(name: str, device: torch.device) -> str:
    """The implementation that runs on `device` (`loss_implementation`); liger is refused off CUDA."""
    check_loss_name(name)
    if name == "fused":
        return loss_implementation(name, device.type)
    if name == "liger" and device.type != "cuda":
        raise ConfigError("model.loss", f"liger runs on CUDA only (this run is on {device.type})",
                          "use model.loss: fused or chunked")
    return name


def supervised_hidden(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a supervised token, and those tokens.

    Position t predicts label t+1 (the shift every causal-LM loss makes), so a row's last position predicts
    nothing and its first label is never predicted.

    Args:
        hidden: (B, T, H) final hidden states.
        labels: (B, T) token ids, -100 where not supervised.

    Returns:
        (n, H) hidden states and (n,) targets, n = number of supervised (shifted) positions.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(x_i W^T + b, y_i) / normalizer, with the gradients computed chunk by chunk in forward.

    Forward keeps only dL/dx (n, H) and, if W trains, dL/dW: never the (n, V) logits. The matmuls run in the
    autocast dtype when autocast is on (as nn.Linear would), the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                normalizer: float, chunk_rows: int) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        w = weight.to(dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        total = x.new_zeros((), dtype=acc)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, x.shape[0], chunk_rows):
                xc = x[start:start + chunk_rows].to(dtype)  # (c, H)
                yc = targets[start:start + chunk_rows]
                logits = (xc @ w.t()).to(acc)  # (c, V)
                if bias is not None:
                    logits += bias.to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
                if not (need_x or need_w or need_b):
                    continue
                # d(sum CE)/d logits = softmax - onehot, computed in place over the logits
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0
                grad_low = grad.to(dtype)
                if need_x:
                    grad_x[start:start + chunk_rows] = (grad_low @ w).to(x.dtype)
                if need_w:
                    grad_w += grad_low.t().to(acc) @ xc.to(acc)
                if need_b:
                    grad_b += grad.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.normalizer = normalizer
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = grad_output / ctx.normalizer
        gx = grad_x * scale.to(grad_x.dtype) if grad_x is not None else None
        gw = (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None
        gb = (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None
        return gx, gw, gb, None, None, None


def linear_cross_entropy(x: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, impl: str = "chunked",
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `lm_head(x)` against `targets`, without materialising all logits.

    Args:
        x: (n, H) hidden states (already restricted to supervised positions).
        lm_head: the model's output projection (a plain nn.Linear).
        targets: (n,) token ids, all supervised.
        impl: chunked or liger.
        chunk_rows: rows of logits per chunk (chunked).
    """
    if x.shape[0] == 0:  # nothing supervised: a zero that still has a graph (the standard loss gives NaN)
        return x.sum() * 0.0
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        dtype = lm_head.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        bias = lm_head.bias.to(dtype) if lm_head.bias is not None else None
        return LigerFusedLinearCrossEntropyLoss()(lm_head.weight.to(dtype), x.to(dtype), targets, bias)
    return ChunkedLinearCrossEntropy.apply(x, lm_head.weight, lm_head.bias, targets, float(x.shape[0]), chunk_rows)


def output_layer(causal_lm: nn.Module, loss: str) -> nn.Linear:
    """The LM head the fused loss multiplies by, refused when it is not a plain linear layer.

    Raises:
        ValueError: the head is wrapped (an adapter on lm_head) or the model post-processes its logits
            (soft-capping, scaling), which the fused loss would skip.
    """
    head = causal_lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ConfigError("model.loss", f"{loss} needs a plain nn.Linear LM head, this model's is "
                          f"{type(head).__name__} (an adapter on lm_head?)", "use model.loss: standard")
    config = causal_lm.config
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ConfigError("model.loss", f"{loss} does not apply this model's {key}", "use model.loss: standard")
    return head


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, impl: str) -> torch.Tensor:
    """The standard loss without full logits: decoder -> hidden states at supervised positions -> LM head +
    cross-entropy chunk by chunk (`impl`: chunked or liger); `inputs` are the decoder's (no labels)."""
    causal_lm = causal_lm_of(model)
    hidden = causal_lm.get_decoder()(**inputs).last_hidden_state  # (B, T, H)
    hidden, targets = supervised_hidden(hidden, labels)  # (n, H), (n,)
    return linear_cross_entropy(hidden, causal_lm.get_output_embeddings(), targets, impl)
