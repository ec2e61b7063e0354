"""Our own FLOP count of a training step and the devices' peak FLOP/s, for MFU.

Why our own: Lightning's `ThroughputMonitor` needs a FLOP count we would have to measure with FlopCounterMode
(which cannot see inside bitsandbytes' 4-bit kernels and counts packed 4-bit weights wrongly), and its device
table holds datasheet peaks, where ours holds what a bf16 matmul reaches on the H200 (below;
docs/decisions/004-flops-and-peaks.md). A transformer's FLOPs follow from its config, so we count them from the
config: hidden, intermediate, layers, heads, KV heads, vocab.

The count, per optimizer step (all FLOPs are multiply-adds x 2):

    N        = matmul weights: L * (h*nh*d + 2*h*nkv*d + nh*d*h + 3*h*i) + h*V   (q, k, v, o, gate/up/down,
               LM head; embeddings are a lookup, not a matmul; packed 4-bit weights count as what they stand for)
    A_fwd    = 4 * L * nh*d * pairs   where pairs = sum over records of T(T+1)/2, the causal (query, key) pairs
               (QK^T and AV, each 2*nh*d FLOPs a pair; causal: only the lower triangle is needed)
    model    = tokens * (4 * N_frozen + 6 * P_trained) + 3 * A_fwd
               frozen weights: forward 2 + input-gradient 2 (backward still needs dL/dx through them);
               trained weights (the adapter, or the base in full fine-tuning): forward 2 + input-grad 2 + weight-grad 2;
               attention: forward 1x + backward 2x (dQ, dK, dV, dP)
    hardware = model + (tokens * 2 * (N_body + P_trained) + A_fwd) with gradient checkpointing (every decoder
               layer's forward runs again in backward; the LM head is not recomputed)

`tokens` are real (non-pad) tokens; the LM head is counted at every real token (the usual convention, although
`model.loss: fused` runs it at supervised positions only: 2 % of Llama-2-7B's N). Adapter FLOPs are counted as
6 per trainable parameter per token, exact for LoRA (x @ A^T @ B^T), an upper bound for IA3-like scalings.
MFU = model FLOPs / (seconds * devices * peak); HFU the same with hardware FLOPs.

Peaks: dense (no sparsity) tensor-core rates from the vendors' datasheets, except the H200 (SXM), whose bf16
entry, 790e12, is the rate a large bf16 matmul reaches there; no matmul reaches the datasheet's 989.4e12
(the measurement: docs/decisions/004-flops-and-peaks.md). So MFU on an H200 is relative to what a matmul can
reach; multiply by 790/989.4 for datasheet-relative MFU. `efficiency.peak_flops` overrides the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class TransformerShape:
    """The shape of a decoder-only transformer, as far as FLOPs are concerned.

    Attributes:
        hidden: model width h.
        intermediate: MLP width i (gated MLP: gate, up and down projections).
        layers: decoder layers L.
        heads: query heads nh.
        kv_heads: key/value heads nkv (grouped-query attention when < heads).
        head_dim: d (h / nh unless the config says otherwise).
        vocab: LM-head rows V.
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "TransformerShape":
        """From a transformers config (LLaMA family: `hidden_size`, `intermediate_size`, ...).

        Raises:
            ValueError: the config lacks one of the fields (not a LLaMA-like decoder).
        """
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if getattr(config, k, None) is None]
        if missing:
            raise ValueError(f"cannot count FLOPs of a {type(config).__name__}: it has no {', '.join(missing)}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
        )

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

    @property
    def body_matmul_params(self) -> int:
        return self.layers * self.layer_matmul_params

    @property
    def head_matmul_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def matmul_params(self) -> int:
        """N: every weight that takes part in a matmul per token (embeddings excluded)."""
        return self.body_matmul_params + self.head_matmul_params

    def attention_forward_flops(self, pairs: float) -> float:
        """QK^T and AV over `pairs` causal (query, key) pairs, all layers."""
        return 4.0 * self.layers * self.heads * self.head_dim * pairs


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of some training work.

    Attributes:
        model: what the training needs (no recomputation).
        hardware: what runs, recomputation by gradient checkpointing included.
    """

    model: float
    hardware: float


def training_flops(
    shape: TransformerShape,
    tokens: float,
    pairs: float,
    trained_params: int,
    frozen_matmul_params: Optional[int] = None,
    recompute: bool = False,
) -> StepFlops:
    """FLOPs of training on `tokens` real tokens holding `pairs` causal attention pairs (module docstring).

    Args:
        shape: the model's shape.
        tokens: real (non-pad) tokens processed.
        pairs: sum over records of T(T+1)/2.
        trained_params: trainable parameters taking part in matmuls (the adapter's; full fine-tuning: the base's).
        frozen_matmul_params: frozen matmul weights; default N (an adapter on a frozen base).
        recompute: gradient checkpointing recomputes each decoder layer's forward in backward.
    """
    frozen = shape.matmul_params if frozen_matmul_params is None else frozen_matmul_params
    attention = shape.attention_forward_flops(pairs)
    model = tokens * (4.0 * frozen + 6.0 * trained_params) + 3.0 * attention
    hardware = model
    if recompute:
        body = min(frozen, shape.body_matmul_params) + trained_params
        hardware += tokens * 2.0 * body + attention
    return StepFlops(model=model, hardware=hardware)


# ------------------------------------------------------------------------------------------------ device peaks
@dataclass(frozen=True)
class DevicePeak:
    """Dense peak FLOP/s of one device.

    Attributes:
        half: bf16 / fp16 tensor cores.
        tf32: TF32 tensor cores (fp32 matmuls when TF32 is allowed).
        fp32: plain fp32.
        source: where `half` comes from.
    """

    half: float
    tf32: float
    fp32: float
    source: str


_DATASHEET = "vendor datasheet, dense"
# First pattern that matches the lower-cased `torch.cuda.get_device_name()` wins: specific names first.
DEVICE_PEAKS: list[tuple[str, DevicePeak]] = [
    (r"gh200", DevicePeak(989.4e12, 494.7e12, 66.9e12, _DATASHEET)),
    (r"h200 nvl", DevicePeak(835.5e12, 417.5e12, 60.0e12, _DATASHEET)),
    # 'NVIDIA H200' (SXM): the bf16 rate a matmul reaches (module docstring); datasheet 989.4e12
    (r"h200", DevicePeak(790e12, 494.7e12, 66.9e12, "the bf16 rate a matmul reaches on an H200 (datasheet 989.4e12)")),
    (r"h100.*(pcie|hbm2e)", DevicePeak(756.5e12, 378.0e12, 51.2e12, _DATASHEET)),
    (r"h100 nvl", DevicePeak(835.5e12, 417.5e12, 60.0e12, _DATASHEET)),
    (r"h100", DevicePeak(989.4e12, 494.7e12, 66.9e12, _DATASHEET)),  # SXM ('NVIDIA H100 80GB HBM3')
    (r"a100", DevicePeak(312e12, 156e12, 19.5e12, _DATASHEET)),
    (r"l40s", DevicePeak(362.05e12, 183.0e12, 91.6e12, _DATASHEET)),
    (r"\bl4\b", DevicePeak(121e12, 60e12, 30.3e12, _DATASHEET)),
]

HALF_PRECISIONS = ("bf16", "16", "transformer-engine")


def lookup_peak(device_name: str) -> Optional[DevicePeak]:
    """Our table's entry for a CUDA device name (e.g. 'NVIDIA H200'), or None."""
    name = device_name.lower()
    for pattern, peak in DEVICE_PEAKS:
        if re.search(pattern, name):
            return peak
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """The device's peak FLOP/s for the trainer's precision, and where the number comes from.

    None on a CPU (MFU is then not reported) and on a GPU that neither our table nor Lightning's knows.
    `precision` is the trainer's (`bf16-mixed`, `32-true`, ...): half precisions use the tensor-core bf16/fp16
    rate (4-bit layers dequantize to bf16 and multiply there), 32-bit the TF32 rate when TF32 is allowed.
    """
    if device.type != "cuda":
        return None, "none (not a CUDA device)"
    precision = str(precision)
    if precision.startswith("64"):
        return None, "none (float64)"
    half = precision.startswith(HALF_PRECISIONS)
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak(name)
    if peak is not None:
        if half:
            return peak.half, f"{name}: {peak.source}"
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return (peak.tf32 if tf32 else peak.fp32), f"{name}: {_DATASHEET}"
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16 if half else torch.float32)
    return (float(flops), f"{name}: Lightning's table") if flops else (None, f"none ({name} unknown)")
