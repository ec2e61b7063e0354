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

- auto-wrap policy: peft's `fsdp_auto_wrap_policy` of the transformers model (one FSDP unit per decoder layer,
  one per trainable adapter leaf), so no flat parameter mixes frozen and trainable tensors and each layer is
  gathered alone. Without it the whole base is one unit: every rank gathers all of it (`wrap_policy`).
- checkpoints: only the trainable tensors are gathered to rank 0, one unit at a time (the base is reloaded,
  never saved), instead of Lightning's full state dict, which would gather the whole quantized base for every
  save; the optimizer state stays keyed by names (Lightning re-keys it by position in `model.parameters()`,
  an order that changes once the model has run a step).

What the model side does under FSDP (decided by the run plan, `model/plan.py` and `model/rules.py`; carried out
by `model/build.py`): the base is built in CPU memory (`model.fsdp_load_on: cpu`) so FSDP moves one unit at a
time to the GPU, 4-bit weights are stored as the precision's float dtype (`bnb_4bit_quant_storage`; FSDP can only
shard float tensors), norms are not upcast (FSDP's flat parameters need one dtype), int8 bases and `32-true`
precision are refused (FSDP would cast the packed 4-bit bytes), and so are adapters whose float32 tensors would
share a unit with the base (the method table's `fsdp_flattenable`; `check_flattenable` once the model is built).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_qpeft.core.errors import ConfigError


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
            peft's policy for the model being trained. `state_dict_type: sharded` and `use_orig_params: false`
            are refused: the adapter-only checkpoint is a full one, gathered from the original parameters.
    """

    strategy_name = "fsdp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._state_dict_type != "full":
            raise ConfigError("trainer.strategy.state_dict_type",
                              "checkpoints hold the adapter only, gathered in full to rank 0 (a sharded checkpoint "
                              "would expect the quantized base in it)", "use full",
                              head=f"trainer.strategy.state_dict_type={self._state_dict_type}")
        if self.kwargs.get("use_orig_params") is False:
            raise ConfigError("trainer.strategy.use_orig_params", "the adapter is saved and its optimizer state named "
                              "through the original parameters", "use true (the default)",
                              head="trainer.strategy.use_orig_params=false")

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = wrap_policy(model)
        return super()._setup_model(model)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state keyed by parameter names (rank 0's, full).

        Lightning re-keys it by position in `model.parameters()` (`rekey_optim_state_dict(..., PARAM_ID,
        model)`) and back by position at resume. Under `use_orig_params` that order changes once the model has
        run a step (the trained model lists the adapter's tensors first, a freshly wrapped one the embeddings),
        so ids would name the wrong tensors at resume (docs/decisions/003-fsdp-units-and-names.md); keyed by name
        the state is independent of that order, and Lightning's load takes names as they are.
        """
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with _get_full_state_dict_context(self.model, world_size=self.world_size):
            return FSDP.optim_state_dict(self.model, optimizer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Trainable tensors only, gathered to rank 0 one FSDP unit at a time (other ranks return an empty dict).

        Each unit that owns trainable tensors (peft's policy makes each LoRA leaf a unit) is gathered alone:
        gathering from the root would unshard the whole quantized base at every save. Copied to the CPU here
        rather than by FSDP's `offload_to_cpu`, which FSDP refuses for unsharded units (world size 1 runs NO_SHARD).
        """
        return gather_trainable(self.model, self.lightning_module, self.global_rank)


def wrap_policy(module: nn.Module) -> Any:
    """peft's FSDP policy for the model a LightningModule trains: a unit per decoder layer, one per trainable leaf.

    peft reads the decoder layer's class from `_no_split_modules`, which the transformers model has and the
    LightningModule (what Lightning wraps) does not: given the LightningModule, its policy wraps no decoder
    layer, so the whole base would become one root unit - every rank would hold it twice while FSDP flattened it
    and gather all of it for each forward. Given the transformers model, a GPU's set-up peak stays its shard plus
    the unit being wrapped (docs/decisions/003-fsdp-units-and-names.md).
    """
    from peft.utils.other import fsdp_auto_wrap_policy

    inner = getattr(module, "model", None)
    return fsdp_auto_wrap_policy(inner if isinstance(inner, nn.Module) else module)


def gather_trainable(root: nn.Module, module: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """`module`'s trainable tensors, unsharded, on the CPU, named as unwrapped (rank 0; others get {}), from
    the FSDP-wrapped `root`: one unit at a time (see `QPeftFSDPStrategy.lightning_module_state_dict`)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    # FSDP sets up its root at the first forward; a unit gathered before that (a save before the first step:
    # preemption, an export with no step run) would make itself a root and break that forward (seen on the CPU:
    # "Non-root FSDP instance's _is_root should not have been set"). torch has no public call for this.
    _lazy_init(root, root)
    names = {id(p): _clean(n) for n, p in module.named_parameters() if p.requires_grad}
    state: dict[str, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(root):
        owned = [p for p in _owned_parameters(unit) if id(p) in names]
        if not owned:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if rank == 0:
                state.update({names[id(p)]: p.detach().to("cpu", copy=True) for p in owned})
    return state


def check_flattenable(model: nn.Module, method: str) -> None:
    """Refuse an adapter whose trainable tensors would share an FSDP unit with tensors of another dtype.

    FSDP flattens each unit into one dtype. peft's wrap policy (`wrap_policy`) gives units of their own to LoRA's
    A and B and to prompt encoders; tensors outside those (IA3's and VeRA's vectors, AdaLoRA's factors,
    BOFT's rotations) stay in their decoder layer's unit, and float32 ones beside the bfloat16 base fail inside
    FSDP ("Must flatten tensors with uniform dtype") with no key named. Units are assigned as FSDP's recursive
    wrap assigns them: a module the policy wraps starts a unit, every other module belongs to the nearest one
    above it (the root's at the top).
    """
    policy = wrap_policy(model)
    units: dict[str, list[tuple[str, nn.Parameter]]] = {}

    def walk(module: nn.Module, name: str, unit: str) -> None:
        if name and policy(module=module, recurse=False, nonwrapped_numel=0):
            unit = name
        units.setdefault(unit, []).extend((f"{name}.{n}" if name else n, p)
                                          for n, p in module.named_parameters(recurse=False))
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, unit)

    walk(model, "", "")
    for unit, params in units.items():
        dtypes = {p.dtype for _, p in params}
        trainable = [(n, p) for n, p in params if p.requires_grad]
        if len(dtypes) > 1 and trainable:
            name, p = trainable[0]
            others = "/".join(sorted(str(d) for d in dtypes - {p.dtype}))
            raise ConfigError(
                "trainer.strategy", f"its trainable tensor {name} ({p.dtype}) would share the FSDP unit "
                f"{unit or '(root)'} with {others} tensors, and FSDP flattens a unit into one dtype",
                "use trainer.strategy=ddp, or an adapter made of layers (lora, prompt_tuning)",
                head=f"model.adapter={method} cannot run with trainer.strategy=fsdp")


def _owned_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The original parameters one FSDP unit flattens, as FSDP lists them (a unit may own none)."""
    handle = getattr(unit, "_handle", None)  # FSDP's own record: shared and ignored tensors come out right
    return list(handle.flat_param._params) if handle is not None else []


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
