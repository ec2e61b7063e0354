"""`QPeftModule`: a quantized causal LM with a PEFT adapter, as a LightningModule.

Config keys (`model.*`):
    base_model, quantization, compute_dtype, dtype, quant_storage, attn_implementation, trust_remote_code:
        what to load and how (see `loading.py`, `quantization.py`)
    adapter:                 a peft config (`configs/adapter/*.yaml`) or `FullFineTuning`; none: the bare base.
                             Combinations the compatibility table (`compat.py`) refuses fail in __init__
    adapter_path:            a trained adapter folder (peft `save_pretrained` output) to evaluate or train on
    gradient_checkpointing:  recompute activations in backward (less memory, ~30 % more time)
    upcast_norms:            RMSNorm weights in float32
    upcast_embeddings:       also embeddings and LM head in float32 (the peer recipe's numerics; +1 GiB on 7B)
    loss:                    standard | fused | chunked | liger: where the LM head + cross-entropy run
                             (`fused_loss.py`: fused computes them at supervised positions only, chunk by chunk)
    compile, compile_options, compile_scope: torch.compile each decoder layer's attention and MLP, or the whole
                             layer (`preparation.compile_layers`)
    compile_dequantize:      trace bitsandbytes' 4-bit dequantization into the compiled graphs (`traced_dequant.py`)
    optimizer, lr_scheduler: callables applied to the trainable parameters only
    generation:              decoding settings for `predict` and generation metrics

The model is built in `configure_model` (each rank loads its own quantized base onto its own device), so
one `QPeftModule` serves fit, validate, test and predict. Checkpoints hold the trainable tensors only: the
quantized base is reloaded from `base_model`, never saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lightning_qpeft.base_models.folders import resolve_base_model
from lightning_qpeft.checkpointing import rng_states, set_rng_states
from lightning_qpeft.core.tensors import all_finite
from lightning_qpeft.core.tokens import IGNORE_INDEX
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.distributed import check_flattenable, global_token_mean
from lightning_qpeft.model.accumulation import TokenMeanAccumulator, world_tokens
from lightning_qpeft.model.adapters import (
    AdapterConfig,
    adapter_to_dict,
    attach_adapter,
    load_adapter_config,
    method_name,
)
from lightning_qpeft.model.counting import count_parameters
from lightning_qpeft.model.fused_loss import (
    causal_lm_of,
    linear_cross_entropy,
    output_layer,
    supervised_hidden,
)
from lightning_qpeft.model.generation import Generation, generate
from lightning_qpeft.model.facts import RunConfig, trainer_facts
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.plan import RunPlan, resolve_plan, with_data
from lightning_qpeft.model.preparation import compile_layers, prepare_base
from lightning_qpeft.model.rules import nothing_to_train
from lightning_qpeft.model.schedules import needs_total_steps
from lightning_qpeft.model.traced_dequant import set_traced_dequantize

# batch keys that go to the model's forward; the rest (metadata for generation) stays out
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def _clean_name(name: str) -> str:
    # FSDP (use_orig_params) and activation checkpointing insert wrapper modules into parameter names
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class QPeftModule(LightningModule):
    """A (quantized) causal LM with a PEFT adapter.

    Args:
        base_model: hub id or local model folder (`checkpoints/tiny-llama` is built on first use), or
            random:<shape> (random weights of a real shape, for benchmarks).
        tokenizer: tokenizer folder or hub id; default the base model's (the data module gets the same).
        quantization: none, nf4, nf4-dq, fp4, fp4-dq or int8.
        compute_dtype: dtype of 4-bit matmuls: bfloat16, float16 or float32.
        dtype: dtype of the unquantized weights (auto: the checkpoint's for `none`, `compute_dtype` otherwise).
        quant_storage: storage dtype of packed 4-bit weights: auto (uint8; under FSDP the precision's float dtype,
            which FSDP needs to shard them), uint8, bfloat16, float16.
        adapter: a peft config (e.g. configs/adapter/qlora.yaml) or FullFineTuning; None: the bare base model.
        adapter_path: folder of a trained adapter to load instead of a new one (evaluate, predict, train on).
        gradient_checkpointing: recompute activations in backward.
        upcast_norms: keep normalisation weights in float32.
        upcast_embeddings: cast every weight that is not quantized (embeddings, LM head, norms) to float32, as
            peft's prepare_model_for_kbit_training does (to reproduce the peer recipe; costs memory and time).
        loss: standard (the model's own loss over full logits), fused (LM head + cross-entropy at supervised
            positions only, chunked: liger-kernel on CUDA when installed, else torch), chunked, or liger.
        compile: torch.compile the decoder layers (what of them: compile_scope).
        compile_options: keyword arguments of torch.compile (e.g. {"mode": "max-autotune-no-cudagraphs"}).
        compile_scope: attention_mlp (two graphs a layer) or decoder_layer (one graph a layer, norms and residual
            adds included); the gradient checkpoint stays outside the graphs either way.
        compile_dequantize: with compile, trace bitsandbytes' 4-bit dequantization into the graphs as torch ops
            (the values of its kernels: bit for bit on the CPU) instead of calling its Python-dispatched ops.
        optimizer: optimizer factory, given the trainable parameters.
        lr_scheduler: scheduler factory, stepped every optimizer step.
        generation: decoding settings for predict and generation metrics.
        attn_implementation: transformers attention backend (sdpa, eager, flash_attention_2).
        trust_remote_code: allow the model folder's own Python code to run (off: it would run on load).
        fsdp_load_on: under trainer.strategy=fsdp, where each rank builds its quantized base before FSDP shards
            it: cpu (FSDP then moves one unit at a time to the GPU: no GPU builds the whole base first; costs the
            4-bit base in CPU memory on every rank, and a checkpoint is quantized by bitsandbytes on the CPU,
            slower than on the GPU; random:<shape> bases are still quantized on the GPU) or device (on the GPU,
            as under DDP: the whole base must fit one GPU).
    """

    # which way each logged metric is better (the run's metrics file records them for the study)
    metric_directions = {"train/loss": "lower", "val/loss": "lower", "val/ppl": "lower", "test/loss": "lower",
                         "test/ppl": "lower", "params/trainable": "lower", "params/total": "lower"}

    def __init__(
        self,
        base_model: str = "checkpoints/tiny-llama",
        tokenizer: Optional[str] = None,
        quantization: str = "nf4-dq",
        compute_dtype: str = "bfloat16",
        dtype: str = "auto",
        quant_storage: str = "auto",
        adapter: Optional[AdapterConfig] = None,
        adapter_path: Optional[str] = None,
        gradient_checkpointing: bool = False,
        upcast_norms: bool = True,
        upcast_embeddings: bool = False,
        loss: str = "standard",
        compile: bool = False,
        compile_options: Optional[dict[str, Any]] = None,
        compile_scope: str = "attention_mlp",
        compile_dequantize: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        generation: Optional[Generation] = None,
        attn_implementation: Optional[str] = "sdpa",
        trust_remote_code: bool = False,
        fsdp_load_on: str = "cpu",
    ) -> None:
        super().__init__()
        self.base_model = base_model
        self.tokenizer_name = tokenizer or base_model
        self.quantization = quantization
        self.compute_dtype = compute_dtype
        self.dtype_name = dtype
        self.adapter_path = adapter_path
        from_path = adapter is None and adapter_path is not None
        self.adapter = load_adapter_config(adapter_path) if from_path else adapter
        self.config = RunConfig(
            adapter=self.adapter, adapter_path=adapter_path, adapter_from_path=from_path, quantization=quantization,
            compute_dtype=compute_dtype, dtype=dtype, quant_storage=quant_storage,
            gradient_checkpointing=gradient_checkpointing, upcast_norms=upcast_norms,
            upcast_embeddings=upcast_embeddings, loss=loss, compile=compile, compile_scope=compile_scope,
            compile_dequantize=compile_dequantize, fsdp_load_on=fsdp_load_on)
        # what the configuration alone makes impossible is refused here, before any weight loads; the plan
        # itself is resolved once the trainer is known (`setup`)
        resolve_plan(self.config)
        self.plan: Optional[RunPlan] = None
        self._rng_to_restore: Optional[dict[str, Any]] = None  # set by on_load_checkpoint, applied at train start
        self.gradient_checkpointing = gradient_checkpointing
        self.loss = loss
        self.compile_options = compile_options
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
                "loss": loss,
            }
        )
        self.model: Optional[torch.nn.Module] = None
        self.strict_loading = False  # checkpoints hold trainable tensors only (checked in on_load_checkpoint)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.accumulator = TokenMeanAccumulator()

    # ----------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        """Resolve the run plan: the trainer and the data module are known here, and no weight has loaded yet."""
        self.plan = self.resolve_plan(self._trainer, getattr(self._trainer, "datamodule", None), stage == "fit")
        for warning in self.plan.warnings:
            rank_zero_warn(warning)

    def resolve_plan(self, trainer: Any = None, datamodule: Any = None, fitting: Optional[bool] = None) -> RunPlan:
        """The plan of this configuration on `trainer` with `datamodule`'s packing (`plan.resolve_plan`)."""
        return resolve_plan(with_data(self.config, datamodule), trainer_facts(trainer, fitting))

    def configure_model(self) -> None:
        """Load this rank's base onto this rank's device and attach the adapter (once)."""
        if self.model is not None:
            return
        if self.plan is None:  # configure_model without setup (a module used outside a trainer's loop)
            self.plan = self.resolve_plan(self._trainer)
        plan = self.plan
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        if plan.total_steps is not None:
            # the method's schedule is laid out over the run's optimizer steps, which only the trainer knows
            self.adapter = plan.total_steps(self.adapter, self._total_steps(f"model.adapter={self.method}"))
        base = load_base_model(
            self.base_model,
            quantization=self.quantization,
            compute_dtype=self.compute_dtype,
            dtype=self.dtype_name,
            quant_storage=plan.quant_storage,
            device=torch.device("cpu") if plan.load_on_cpu else device,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            quantize_device=device,
        )
        base = prepare_base(base, self.gradient_checkpointing, plan.upcast_norms, plan.upcast_embeddings)
        path = resolve_base_model(self.base_model)
        base_path = path if Path(path).is_dir() else None  # LoftQ reads the unquantized weights from here
        self.model = attach_adapter(base, self.adapter, self.adapter_path, base_path=base_path)
        if plan.check_flattenable:  # what the rules cannot know of a method without a row
            check_flattenable(self.model, self.method)
        if plan.loss != "standard":
            output_layer(causal_lm_of(self.model), self.loss)  # refuse a head the fused loss would get wrong
        # process-wide (inductor's decomposition table): set by every module, so none inherits another's
        set_traced_dequantize(plan.compile_dequantize)
        if plan.compile:
            scope = self.config.compile_scope
            n = compile_layers(self.model, self.compile_options, scope)
            what = "attention and MLP modules" if scope == "attention_mlp" else "decoder layers"
            rank_zero_info(f"model.compile: {n} {what} compiled (options {self.compile_options or {}}"
                           + ("; 4-bit dequantization traced" if plan.compile_dequantize else "") + ")")

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    @property
    def loss_impl(self) -> str:
        """What model.loss resolves to on this run's device (standard until the plan is resolved)."""
        return self.plan.loss if self.plan is not None else "standard"

    @property
    def method(self) -> str:
        return method_name(self.adapter)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; packed 4-bit weights counted as the weights they stand for."""
        return count_parameters(self.model)

    def trainable_names(self) -> list[str]:
        """State-dict keys of the trainable parameters (the checkpoint's content), without wrapper prefixes."""
        return sorted(_clean_name(n) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state restricted to trainable parameters (single process)."""
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    # ----------------------------------------------------------------------------------- steps
    def forward(self, num_items_in_batch: Optional[torch.Tensor] = None, **batch: torch.Tensor) -> Any:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        return self.model(**inputs)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss over the batch's supervised tokens, and how many there are (for token-weighted means).

        The mean is taken as sum / max(n, 1) (transformers' `num_items_in_batch`): a batch without a
        supervised token gives loss 0 and zero gradients instead of NaN (0 / 0), and no host sync is needed.
        Padded (B, T) and packed (1, sum of lengths) batches give the same value for the same records.
        """
        n_supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if self.loss_impl == "standard":
            loss = self(**batch, num_items_in_batch=n_supervised.clamp(min=1)).loss
        else:
            loss = self._supervised_loss(batch)
        return loss, n_supervised

    def _supervised_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same loss without full logits: decoder -> hidden states at supervised positions -> fused
        LM head + cross-entropy (`fused_loss.py`)."""
        causal_lm = causal_lm_of(self.model)
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and k != "labels"}
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state  # (B, T, H)
        hidden, targets = supervised_hidden(hidden, batch["labels"])  # (n, H), (n,)
        return linear_cross_entropy(hidden, causal_lm.get_output_embeddings(), targets, self.loss_impl)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, n = self._step(batch)
        logged = loss
        distributed = self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized()
        if distributed:
            loss, logged = global_token_mean(loss, n, self.trainer.world_size)
        if self._accumulates():  # the step's loss: the mean over all its micro-batches' tokens (accumulation.py)
            return self.accumulator.add(loss, world_tokens(n) if distributed else n, logged)
        self.log("train/loss", logged, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._accumulates():
            mean = self.accumulator.finish(optimizer, self.trainer.accumulate_grad_batches)
            if mean is not None:
                self.log("train/loss", mean, prog_bar=True)

    def _accumulates(self) -> bool:
        return self._trainer is not None and self.trainer.accumulate_grad_batches > 1

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
        # MeanMetric.compute() already reduced across ranks: every rank holds the same value, and
        # sync_dist=True (a mean of equal values) only keeps Lightning from warning about it
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=50)), sync_dist=True)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_ids: list[int], pad_id: int,
                 **overrides: Any) -> torch.Tensor:
        """Continuations only, (B, new_tokens), for left-padded prompts, under the trainer's precision context;
        each answer ends at the first of `stop_ids` (`model/generation.py`)."""
        context = self.trainer.precision_plugin.forward_context if self._trainer is not None else None
        return generate(self.model, input_ids, attention_mask, self.generation, stop_ids, pad_id, context, **overrides)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Generate for each prompt; the prediction writer turns these into JSON lines."""
        dm = self.trainer.datamodule
        tokens = self.generate(batch["input_ids"], batch["attention_mask"], dm.stop_ids, dm.tokenizer.pad_token_id)
        texts, stopped = dm.decode(tokens)
        return [{**meta, "prediction": text, "stopped": done} for meta, text, done in zip(batch["meta"], texts, stopped)]

    # ----------------------------------------------------------------------------------- hooks
    def on_train_start(self) -> None:
        # from_pretrained returns eval mode, and Lightning keeps modules' modes: without this, dropout and
        # gradient checkpointing would silently be off during training (on_fit_start sets it too, before
        # Lightning's check for modules left in eval mode; the sanity validation restores it)
        self.model.train()
        if self._rng_to_restore is not None:  # resumed: draw the dropout masks an unbroken run draws
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_fit_start(self) -> None:
        self.model.train()
        trainable, total = self.parameter_counts()
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
        self.print(f"adapter {self.method}: {trainable:,} trainable of {total:,} parameters "
                   f"({100 * trainable / max(total, 1):.3f} %)")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # the step has run; Lightning counts it (global_step += 1) only after this hook returns, and zeroes
        # the gradients only before the next step, so global_step is this step's 0-based index here
        self.after_optimizer_step(self.trainer.global_step)

    def after_optimizer_step(self, step: int) -> None:
        """Per-method work after optimizer step `step` (0-based), while the gradients are still there: the
        method row's `after_step` (AdaLoRA reallocates its rank budget)."""
        if self.plan is not None and self.plan.after_step is not None:
            self.plan.after_step(self.model, step)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        if gradient_clip_val and self.plan is not None and self.plan.clip_with_fsdp:
            # Lightning's FSDP precision refuses norm clipping (`trainer.gradient_clip_val`, QLoRA's 0.3); FSDP's
            # own clip_grad_norm_ computes the norm over every rank's shard, which is what clipping by norm means
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:  # the plan refuses the known cases in setup, before any weight loads; here, the same words
            self.resolve_plan(self._trainer, getattr(self._trainer, "datamodule", None), fitting=True)
            raise nothing_to_train(self.method)
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if needs_total_steps(scheduler):
            scheduler.set_total_steps(self._total_steps(f"model.lr_scheduler ({type(scheduler).__name__})"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self, what: str) -> int:
        """The run's optimizer steps, for schedules laid out over them; refused when the run has no end."""
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ConfigError("trainer.max_steps", "set trainer.max_steps or trainer.max_epochs",
                              head=f"{what} is laid out over the run's optimizer steps, and this run has no set length")
        return int(steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors, and record what they belong to (checked when loading)."""
        names = set(self.trainable_names())
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        bad: list[str] = []
        if not bool(all_finite(list(floats.values()))):  # never replace a good checkpoint with a poisoned one
            bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
        checkpoint["rng"] = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning builds the checkpoint on all ranks (it writes it on rank 0), so all ranks are here. Every
            # rank draws its own dropout masks: every rank's generators are kept. The verdict on the tensors is
            # shared too (under FSDP only rank 0 holds them): all ranks refuse together, none waits for the others
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, (checkpoint["rng"], bad))
            checkpoint["rng_per_rank"] = [rng for rng, _ in per_rank]
            bad = sorted({k for _, rank_bad in per_rank for k in rank_bad})
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite tensors: {bad[:3]}")
        checkpoint["state_dict"] = state
        checkpoint["qpeft"] = {
            "base_model": self.base_model,
            "quantization": self.quantization,
            "adapter": adapter_to_dict(self.adapter),
            "tensors": sorted(names),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another adapter or base, saying what differs."""
        meta = checkpoint.get("qpeft")
        if meta is None:
            raise ConfigError("ckpt_path", "not a lightning_qpeft checkpoint (no 'qpeft' entry)")
        expected = self.trainable_names()
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
            raise ConfigError("ckpt_path", "the checkpoint does not match this configuration:\n  " + "\n  ".join(diffs))
        # applied when training starts again: restoring here, before the loops are set up, would let what
        # runs in between (sanity checks, validation) draw from them
        self._rng_to_restore = checkpoint.get("rng")
        per_rank = checkpoint.get("rng_per_rank")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        if per_rank is not None and len(per_rank) == world:
            self._rng_to_restore = per_rank[rank]
        elif (world > 1 or per_rank is not None) and self._fitting():
            rank_zero_warn(f"ckpt_path: saved by {len(per_rank or [None])} process(es), resumed by {world}: the "
                           "random generators (dropout masks) continue from rank 0's, not as an unbroken run's")
