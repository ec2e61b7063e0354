"""Gradient accumulation whose optimizer step follows the mean loss over all of the step's answer tokens.

Config key: `trainer.accumulate_grad_batches` (K micro-batches per optimizer step).

Lightning divides each micro-batch's loss by K and sums the gradients, so a step follows the mean of the
micro-batches' means: a micro-batch with 30 answer tokens weighs as much as one with 300. Across ranks the loss is
already the mean over every rank's tokens (`distributed.global_token_mean`); `TokenMeanAccumulator` does the same
across the K micro-batches, so that K micro-batches of B records train as one of K x B records (the same records:
the sampler cuts them in the same order), up to float rounding.

How, without knowing the later micro-batches' token counts in advance: micro-batch i backpropagates its mean loss
times n_i / n_1 (its tokens over the first micro-batch's: a factor near 1, so fp16 loss scaling sees the usual
magnitudes), and before the optimizer steps, the summed gradients are multiplied by K n_1 / (n_1 + ... + n_K)
(K undoes Lightning's division). Gradient clipping and the non-finite check then see the step's true gradient.
Everything stays on the device: no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class TokenMeanAccumulator:
    """Token-weighted gradient accumulation over one optimizer step (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n_first: Optional[torch.Tensor] = None
        self.n_total: Optional[torch.Tensor] = None
        self.loss_sum: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, n: torch.Tensor, mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One micro-batch -> the loss to backpropagate.

        Args:
            loss: the micro-batch's loss to backpropagate, whose gradient is that of its mean over its tokens.
            n: its supervised tokens (over every rank, under DDP/FSDP).
            mean: its mean loss for logging (default: `loss`).
        """
        n = n.detach().float()
        if self.n_first is None:
            self.n_first = n.clamp(min=1)
            self.n_total = torch.zeros_like(self.n_first)
            self.loss_sum = torch.zeros_like(self.n_first)
        self.n_total = self.n_total + n
        self.loss_sum = self.loss_sum + (loss if mean is None else mean).detach().float() * n
        return loss * (n / self.n_first)

    def finish(self, optimizer: Any, accumulate: int) -> Optional[torch.Tensor]:
        """Scale the summed gradients to the step's token mean; returns the step's mean loss (None: no micro-batch)."""
        if self.n_first is None:
            return None
        scale = accumulate * self.n_first / self.n_total.clamp(min=1)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, dtype), grads in groups.items():
            torch._foreach_mul_(grads, scale.to(device, dtype))
        mean = self.loss_sum / self.n_total.clamp(min=1)
        self.reset()
        return mean


def world_tokens(n: torch.Tensor) -> torch.Tensor:
    """The supervised tokens of this micro-batch over every rank (one small all_reduce, no host sync)."""
    total = n.detach().float().clone()
    torch.distributed.all_reduce(total)
    return total
