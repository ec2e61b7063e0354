"""Several GPUs: DDP works as Lightning ships it; FSDP needs a few choices for a quantized base + adapter.

    --trainer.devices N --trainer.strategy ddp     each rank loads its own quantized base (`configure_model`)
    --trainer.strategy fsdp                        the quantized base sharded across ranks (this module)

Importing `lightning_qpeft.cli` registers `QPeftFSDPStrategy` under Lightning's name `fsdp`, so the plain
flag gets it. What it changes against Lightning's `FSDPStrategy`, and why:

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
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn


def fsdp_param_dtype(precision: str) -> torch.dtype:
    """The dtype FSDP's mixed precision casts parameters to, for a Lightning precision string."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


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
    """Make `--trainer.strategy fsdp` mean `QPeftFSDPStrategy` (idempotent)."""
    StrategyRegistry.register(
        "fsdp", QPeftFSDPStrategy, description="FSDP for quantized bases with adapters", override=True
    )
