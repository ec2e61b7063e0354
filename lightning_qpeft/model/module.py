"""`QPeftModule`: a quantized causal LM with a PEFT adapter, as a LightningModule.

Config keys (`model.*`):
    base_model, quantization, compute_dtype, dtype, quant_storage, attn_implementation, trust_remote_code:
        what to load and how (see `loading.py`, `quantization.py`)
    adapter:                 a peft config (`configs/adapter/*.yaml`) or `FullFineTuning`; none: the bare base
    adapter_path:            a trained adapter folder (peft `save_pretrained` output) to evaluate or train on
    gradient_checkpointing:  recompute activations in backward (less memory, ~30 % more time)
    upcast_norms:            RMSNorm weights in float32
    optimizer, lr_scheduler: callables applied to the trainable parameters only
    generation:              decoding settings for `predict` and generation metrics

The model is built in `configure_model` (each rank loads its own quantized base onto its own device), so
one `QPeftModule` serves fit, validate, test and predict. Checkpoints hold the trainable tensors only: the
quantized base is reloaded from `base_model`, never saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from lightning_qpeft.model.adapters import (
    AdapterConfig,
    adapter_to_dict,
    attach_adapter,
    load_adapter_config,
    method_name,
)
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.preparation import prepare_base
from lightning_qpeft.model.quantization import get_quant_mode, resolve_dtype
from lightning_qpeft.model.schedules import needs_total_steps

# batch keys that go to the model's forward; the rest (metadata for generation) stays out
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
IGNORE_INDEX = -100


@dataclass
class Generation:
    """Decoding settings (greedy by default).

    Attributes:
        max_new_tokens: most tokens generated per prompt.
        do_sample: sample instead of greedy/beam decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        num_beams: beam search width (1: none).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def kwargs(self) -> dict[str, Any]:
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams)
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        return kw


class QPeftModule(LightningModule):
    """A (quantized) causal LM with a PEFT adapter.

    Args:
        base_model: hub id or local model folder (`checkpoints/tiny-llama` is built on first use).
        quantization: none, nf4, nf4-dq, fp4, fp4-dq or int8.
        compute_dtype: dtype of 4-bit matmuls: bfloat16, float16 or float32.
        dtype: dtype of the unquantized weights (auto: the checkpoint's for `none`, `compute_dtype` otherwise).
        quant_storage: storage dtype of packed 4-bit weights: uint8, or the compute dtype for FSDP.
        adapter: a peft config (e.g. configs/adapter/qlora.yaml) or FullFineTuning; None: the bare base model.
        adapter_path: folder of a trained adapter to load instead of a new one (evaluate, predict, train on).
        gradient_checkpointing: recompute activations in backward.
        upcast_norms: keep normalisation weights in float32.
        optimizer: optimizer factory, given the trainable parameters.
        lr_scheduler: scheduler factory, stepped every optimizer step.
        generation: decoding settings for predict and generation metrics.
        attn_implementation: transformers attention backend (sdpa, eager, flash_attention_2).
        trust_remote_code: allow the model folder's own Python code to run (off: it would run on load).
    """

    def __init__(
        self,
        base_model: str = "checkpoints/tiny-llama",
        quantization: str = "nf4-dq",
        compute_dtype: str = "bfloat16",
        dtype: str = "auto",
        quant_storage: str = "uint8",
        adapter: Optional[AdapterConfig] = None,
        adapter_path: Optional[str] = None,
        gradient_checkpointing: bool = False,
        upcast_norms: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        generation: Optional[Generation] = None,
        attn_implementation: Optional[str] = "sdpa",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        # Refuse bad values now, before any weight is loaded.
        get_quant_mode(quantization)
        resolve_dtype(compute_dtype, "model.compute_dtype")
        if dtype != "auto":
            resolve_dtype(dtype, "model.dtype")
        self.base_model = base_model
        self.quantization = quantization
        self.compute_dtype = compute_dtype
        self.dtype_name = dtype
        self.quant_storage = quant_storage
        if adapter is not None and adapter_path is not None:
            raise ValueError("model.adapter and model.adapter_path: set one (a new adapter, or a trained one)")
        self.adapter_path = adapter_path
        self.adapter = load_adapter_config(adapter_path) if adapter_path is not None else adapter
        self.gradient_checkpointing = gradient_checkpointing
        self.upcast_norms = upcast_norms
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.generation = generation or Generation()
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        # Plain data only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "base_model": base_model,
                "quantization": quantization,
                "compute_dtype": compute_dtype,
                "dtype": dtype,
                "adapter": adapter_to_dict(self.adapter),
                "adapter_path": adapter_path,
                "gradient_checkpointing": gradient_checkpointing,
            }
        )
        self.model: Optional[torch.nn.Module] = None
        self.strict_loading = False  # checkpoints hold trainable tensors only (checked in on_load_checkpoint)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    # ----------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Load this rank's base onto this rank's device and attach the adapter (once)."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        base = load_base_model(
            self.base_model,
            quantization=self.quantization,
            compute_dtype=self.compute_dtype,
            dtype=self.dtype_name,
            quant_storage=self.quant_storage,
            device=device,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
        )
        self._warn_fp16_with_4bit()
        base = prepare_base(base, self.gradient_checkpointing, self.upcast_norms)
        self.model = attach_adapter(base, self.adapter, self.adapter_path)

    def _warn_fp16_with_4bit(self) -> None:
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if get_quant_mode(self.quantization).is_4bit and ("float16" == self.compute_dtype or precision.startswith("16")):
            rank_zero_warn(
                "model.compute_dtype=float16 / trainer.precision=16-* with a 4-bit base is a known source of loss "
                "collapse (fp16 overflows in the dequantized matmuls); prefer bfloat16 and bf16-mixed on GPUs that "
                "have it (Ampere and newer)"
            )

    @property
    def method(self) -> str:
        return method_name(self.adapter)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; packed 4-bit weights counted as the weights they stand for."""
        trainable = total = 0
        for p in self.model.parameters():
            n = p.numel()
            if p.__class__.__name__ == "Params4bit":
                n = math.prod(p.quant_state.shape) if p.quant_state is not None else n * 2
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state restricted to trainable parameters (the checkpoint's content)."""
        names = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    # ----------------------------------------------------------------------------------- steps
    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the batch's supervised tokens, and how many there are (for token-weighted means)."""
        loss = self(**batch).loss
        n_supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return loss, n_supervised

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self._step(batch)
        self.val_loss.update(loss, weight=n)

    def on_validation_epoch_end(self) -> None:
        self._log_loss("val", self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self._step(batch)
        self.test_loss.update(loss, weight=n)

    def on_test_epoch_end(self) -> None:
        self._log_loss("test", self.test_loss)

    def _log_loss(self, stage: str, metric: MeanMetric) -> None:
        if metric.update_count == 0:
            return
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)  # MeanMetric already reduced it
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50)), sync_dist=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **overrides: Any) -> torch.Tensor:
        """Continuations only, (B, new_tokens), for left-padded prompts."""
        kwargs = {**self.generation.kwargs(), **overrides}
        tok_pad = self.model.config.pad_token_id
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            pad_token_id=tok_pad if tok_pad is not None else self.model.config.eos_token_id,
            **kwargs,
        )
        return out[:, input_ids.shape[1]:]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate for each prompt; the prediction writer turns these into JSON lines."""
        tokens = self.generate(batch["input_ids"], batch["attention_mask"])
        texts = self.trainer.datamodule.decode(tokens)
        return [{**meta, "prediction": text} for meta, text in zip(batch["meta"], texts)]

    # ----------------------------------------------------------------------------------- hooks
    def on_train_start(self) -> None:
        # from_pretrained returns eval mode, and Lightning keeps modules' modes: without this, dropout and
        # gradient checkpointing would silently be off during training
        self.model.train()

    def on_fit_start(self) -> None:
        trainable, total = self.parameter_counts()
        if self.logger is not None:
            self.logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
        self.print(f"adapter {self.method}: {trainable:,} trainable of {total:,} parameters "
                   f"({100 * trainable / max(total, 1):.3f} %)")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"model.adapter: {self.method} leaves nothing to train; set model.adapter "
                "(e.g. --model.adapter configs/adapter/qlora.yaml) to fine-tune"
            )
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if needs_total_steps(scheduler):
            scheduler.set_total_steps(int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, and record what they belong to (checked when loading)."""
        state = self.trainable_state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never replace a good checkpoint with a poisoned one
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite tensors: {bad[:3]}")
        checkpoint["state_dict"] = state
        checkpoint["qpeft"] = {
            "base_model": self.base_model,
            "quantization": self.quantization,
            "adapter": adapter_to_dict(self.adapter),
            "tensors": sorted(state),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another adapter or base, saying what differs."""
        meta = checkpoint.get("qpeft")
        if meta is None:
            raise ValueError("ckpt_path: not a lightning_qpeft checkpoint (no 'qpeft' entry)")
        expected = sorted(self.trainable_state_dict())
        mine = {"base_model": self.base_model, "quantization": self.quantization, "tensors": expected}
        mine_adapter = adapter_to_dict(self.adapter)
        diffs = [f"{k}: checkpoint {meta[k]!r} vs config {mine[k]!r}" for k in ("base_model", "quantization")
                 if meta.get(k) != mine[k]]
        diffs += [f"model.adapter.{k}: checkpoint {meta['adapter'].get(k)!r} vs config {v!r}"
                  for k, v in mine_adapter.items() if meta["adapter"].get(k) != v and k != "revision"]
        if meta.get("tensors") != expected:
            missing = sorted(set(expected) - set(meta.get("tensors", [])))[:3]
            extra = sorted(set(meta.get("tensors", [])) - set(expected))[:3]
            diffs.append(f"trainable tensors differ (missing {missing}, unexpected {extra})")
        if diffs:
            raise ValueError("ckpt_path: the checkpoint does not match this configuration:\n  " + "\n  ".join(diffs))
