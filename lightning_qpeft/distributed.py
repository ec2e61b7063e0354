"""Several GPUs: Lightning's DDP and FSDP strategies, with the few choices a quantized base + adapter needs.

    --trainer.devices N --trainer.strategy ddp     each rank loads its own quantized base (`configure_model`)
    --trainer.strategy fsdp                        the quantized base sharded across ranks

Importing `lightning_qpeft.cli` registers `QPeftDDPStrategy` and `QPeftFSDPStrategy` under Lightning's names
`ddp` and `fsdp`, so the plain flags get them. What `QPeftDDPStrategy` changes against `DDPStrategy`:

- DDP is built on the stream the forwards run on. Lightning builds it on a side CUDA stream; DDP's reducer
  keeps the AccumulateGrad nodes it creates there, and every backward then accumulates the adapter's
  gradients across streams (torch >= 2.11 warns: "The AccumulateGrad node's stream does not match the stream
  of the node that produced the incoming gradient ... ensure that DDP initialization is performed under the
  same stream as subsequent forwards").

Under both, the training loss is the mean over every rank's supervised tokens (`global_token_mean`), so N
GPUs with micro-batches of B records train as one GPU with micro-batches of N x B (the data module gives
rank r batch r of every step's N: the same records).

What `QPeftFSDPStrategy` changes against Lightning's `FSDPStrategy`, and why:

- auto-wrap policy: peft's `fsdp_auto_wrap_policy` (one FSDP unit per decoder layer, one per trainable
  adapter leaf), so no flat parameter mixes frozen and trainable tensors and each layer is gathered alone.
  Without a policy Lightning wraps the whole model as one unit and every rank gathers all of it.
- checkpoints: only the trainable tensors are gathered to rank 0 (the base is reloaded, never saved),
  instead of Lightning's full state dict, which would gather the whole quantized base for every save.

What the model side does under FSDP (`QPeftModule.configure_model`): 4-bit weights are stored as the
precision's float dtype (`bnb_4bit_quant_storage`; FSDP can only shard float tensors), norms are not upcast
(FSDP's flat parameters need one dtype), int8 bases and `32-true` precision are refused (FSDP would cast the
packed 4-bit bytes).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def fsdp_param_dtype(precision: str) -> torch.dtype:
    """The dtype FSDP's mixed precision casts parameters to, for a Lightning precision string."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def global_token_mean(loss: torch.Tensor, n: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's mean loss over its `n` supervised tokens -> (the loss to backpropagate, the mean over all
    ranks' tokens, for logging).

    DDP and FSDP average the ranks' gradients. Weighting each rank's mean by its share of the step's supervised
    tokens (times the world size) makes that average the gradient of the mean over every rank's tokens: what
    one GPU computes on the union of the micro-batches (transformers' Trainer does the same with
    `average_tokens_across_devices`). Without it a rank with few answer tokens weighs as much as one with many.
    One `all_reduce` on the current stream and no host sync: Lightning's `strategy.reduce` would add a barrier.
    """
    totals = torch.stack([n.float(), loss.detach().float() * n])
    torch.distributed.all_reduce(totals)
    n_all = totals[0].clamp(min=1)
    return loss.float() * (n * world_size / n_all), totals[1] / n_all


class QPeftDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy, with DDP built on the current stream (see the module docstring).

    Args:
        **kwargs: `lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_name = "ddp"

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)


class QPeftFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy with an adapter-aware wrap policy and adapter-only checkpoints.

    Args:
        **kwargs: `lightning.pytorch.strategies.FSDPStrategy` arguments; `auto_wrap_policy` defaults to
            peft's policy for the model being trained.
    """

    strategy_name = "fsdp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            from peft.utils.other import fsdp_auto_wrap_policy

            self.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Trainable tensors only, gathered to rank 0 (other ranks return an empty dict)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        module = self.lightning_module
        with FSDP.summon_full_params(self.model, writeback=False, rank0_only=True, offload_to_cpu=True):
            if self.global_rank != 0:
                return {}
            return {
                _clean(name): p.detach().clone()
                for name, p in module.named_parameters()
                if p.requires_grad
            }


def _clean(name: str) -> str:
    """A parameter name without FSDP's wrapper prefixes (as the unwrapped module names it)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def register_strategies() -> None:
    """Make `--trainer.strategy ddp|fsdp` (and ddp_spawn, ddp_find_unused_parameters_true...) mean
    `QPeftDDPStrategy` / `QPeftFSDPStrategy` (idempotent)."""
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] in (DDPStrategy, QPeftDDPStrategy):
            StrategyRegistry.register(name, QPeftDDPStrategy, description=entry["description"], override=True,
                                      **entry["init_params"])
    StrategyRegistry.register(
        "fsdp", QPeftFSDPStrategy, description="FSDP for quantized bases with adapters", override=True
    )
