"""What a lightning_qpeft checkpoint holds, and the checks on its way out and back in (`CheckpointContent`).

    state_dict     the trainable tensors only: the quantized base is reloaded from `model.base_model`, never saved
    qpeft          what they belong to: base_model, quantization, the adapter's config, the tensors' names
    rng            this process's random generators, so a resumed run draws the dropout masks an unbroken one draws
    rng_per_rank   every rank's generators, under torch.distributed (each rank draws its own masks)

Saving refuses non-finite tensors (a poisoned checkpoint never replaces a good one); loading refuses a checkpoint
of another base or adapter, naming what differs. Everything is tensors and plain data, so checkpoints load with
`torch.load(weights_only=True)` (`checkpointing.AtomicCheckpointIO`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_qpeft.checkpointing import rng_states, set_rng_states
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.core.tensors import all_finite


def clean_name(name: str) -> str:
    """A parameter name without the wrappers FSDP (use_orig_params) and activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def trainable_names(module: nn.Module) -> list[str]:
    """State-dict keys of `module`'s trainable parameters (what a checkpoint keeps), without wrapper prefixes."""
    return sorted(clean_name(n) for n, p in module.named_parameters() if p.requires_grad)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state restricted to its trainable parameters (single process): what a checkpoint keeps."""
    names = set(trainable_names(module))
    return {k: v for k, v in module.state_dict().items() if k in names}


class CheckpointContent:
    """Filters, verifies and restores a `QPeftModule`'s checkpoints; the module's checkpoint hooks delegate here.

    `identity` is what the tensors belong to: `{"base_model": ..., "quantization": ..., "adapter": {...}}`
    (the adapter's config as plain data); `names` are the trainable tensors' state-dict keys.
    """

    def __init__(self) -> None:
        self.rng_to_restore: Optional[dict[str, Any]] = None  # set by `load`, applied by `restore_rng`

    def save(self, checkpoint: dict[str, Any], identity: dict[str, Any], names: list[str]) -> None:
        """Keep only the trainable tensors, record what they belong to and the random generators' states.

        Lightning builds the checkpoint on all ranks (it writes it on rank 0), so under torch.distributed every
        rank is here: the generators are gathered from all of them, and so is the verdict on the tensors (under
        FSDP only rank 0 holds them), so all ranks refuse together and none waits for the others.
        """
        keep = set(names)
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        bad: list[str] = []
        if not bool(all_finite(list(floats.values()))):
            bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
        checkpoint["rng"] = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, (checkpoint["rng"], bad))
            checkpoint["rng_per_rank"] = [rng for rng, _ in per_rank]
            bad = sorted({k for _, rank_bad in per_rank for k in rank_bad})
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite tensors: {bad[:3]}")
        checkpoint["state_dict"] = state
        checkpoint["qpeft"] = {**identity, "tensors": sorted(keep)}

    def load(self, checkpoint: dict[str, Any], identity: dict[str, Any], names: list[str], world_size: int = 1,
             rank: int = 0, fitting: bool = False) -> None:
        """Refuse a checkpoint of another base or adapter (naming what differs); keep this rank's generators.

        They are applied when training starts again (`restore_rng`): restoring them here, before the loops are
        set up, would let what runs in between (sanity checks, validation) draw from them.
        """
        meta = checkpoint.get("qpeft")
        if meta is None:
            raise ConfigError("ckpt_path", "not a lightning_qpeft checkpoint (no 'qpeft' entry)")
        diffs = differences(meta, identity, names)
        if diffs:
            raise ConfigError("ckpt_path", "the checkpoint does not match this configuration:\n  " + "\n  ".join(diffs))
        self.rng_to_restore = checkpoint.get("rng")
        per_rank = checkpoint.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world_size:
            self.rng_to_restore = per_rank[rank]
        elif (world_size > 1 or per_rank is not None) and fitting:
            rank_zero_warn(f"ckpt_path: saved by {len(per_rank or [None])} process(es), resumed by {world_size}: the "
                           "random generators (dropout masks) continue from rank 0's, not as an unbroken run's")

    def restore_rng(self) -> None:
        """Resumed: set the generators a loaded checkpoint saved (once), so the dropout masks continue."""
        if self.rng_to_restore is not None:
            set_rng_states(self.rng_to_restore)
            self.rng_to_restore = None


def differences(meta: dict[str, Any], identity: dict[str, Any], names: list[str]) -> list[str]:
    """What differs between a checkpoint's `qpeft` record and this configuration, one line each."""
    diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {identity[k]!r}" for k in ("base_model", "quantization")
             if meta.get(k) != identity[k]]
    diffs += [f"model.adapter.{k}: checkpoint {meta['adapter'].get(k)!r} vs config {v!r}"
              for k, v in identity["adapter"].items() if meta["adapter"].get(k) != v and k != "revision"]
    if meta.get("tensors") != names:
        missing = sorted(set(names) - set(meta.get("tensors", [])))[:3]
        extra = sorted(set(meta.get("tensors", [])) - set(names))[:3]
        diffs.append(f"trainable tensors differ (missing {missing}, unexpected {extra})")
    return diffs
