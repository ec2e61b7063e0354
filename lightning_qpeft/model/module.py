"""`QPeftModule`: a quantized causal LM with a PEFT adapter, as a LightningModule (config keys: `model.*`, the
constructor's Args below).

The run plan (`plan.py`) decides what the configuration and the trainer imply and refuses what cannot run before
any weight loads: the constructor checks what the configuration alone decides, `setup` resolves the plan with the
trainer's facts. `configure_model` builds the model the plan describes (`build.py`: each rank its own base on its
own device), so one module serves fit, validate, test and predict. The checkpoint hooks hand over to
`checkpoint.py` (trainable tensors only: the quantized base is reloaded, never saved). What stays here: the steps,
the loss and the optimizer, in Lightning's call order.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from lightning_qpeft.core.tokens import IGNORE_INDEX
from lightning_qpeft.distributed import global_token_mean
from lightning_qpeft.model.accumulation import TokenMeanAccumulator, world_tokens
from lightning_qpeft.model.adapters import AdapterConfig, adapter_to_dict, load_adapter_config, method_name
from lightning_qpeft.model.build import build_model
from lightning_qpeft.model.checkpoint import CheckpointContent, trainable_names
from lightning_qpeft.model.counting import count_parameters
from lightning_qpeft.model.facts import RunConfig, optimizer_steps, trainer_facts
from lightning_qpeft.model.fused_loss import supervised_loss
from lightning_qpeft.model.generation import Generation, generate
from lightning_qpeft.model.plan import RunPlan, resolve_plan, with_data
from lightning_qpeft.model.rules import nothing_to_train
from lightning_qpeft.model.schedules import needs_total_steps

# batch keys that go to the model's forward; the rest (metadata for generation) stays out
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


class QPeftModule(LightningModule):
    """A (quantized) causal LM with a PEFT adapter.

    Args:
        base_model: hub id, local model folder (`checkpoints/tiny-llama` is built on first use), .gguf file, or
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
        quantized_outputs: what dtype bitsandbytes layers return: input (bitsandbytes' own rule: their input's,
            float32 after a float32 norm, as in QLoRA's recipe) or autocast (the autocast dtype under autocast, as
            torch's Linear: a 4-bit base then runs a 16-bit base's activation dtypes).
        loss: standard (the model's own loss over full logits), fused (LM head + cross-entropy at supervised
            positions only, chunked: liger-kernel on CUDA when installed, else torch), chunked, or liger.
        compile: torch.compile the decoder layers (what of them: compile_scope).
        compile_options: keyword arguments of torch.compile (e.g. {"mode": "max-autotune-no-cudagraphs"}).
        compile_scope: attention_mlp (two graphs a layer) or decoder_layer (one graph a layer, norms and residual
            adds included); the gradient checkpoint stays outside the graphs either way.
        compile_dequantize: with compile, trace bitsandbytes' 4-bit dequantization into the graphs as torch ops.
        optimizer: optimizer factory, given the trainable parameters.
        lr_scheduler: scheduler factory, stepped every optimizer step.
        generation: decoding settings for predict and generation metrics.
        attn_implementation: transformers attention backend (sdpa, eager, flash_attention_2).
        trust_remote_code: allow the model folder's own Python code to run (off: it would run on load).
        fsdp_load_on: under trainer.strategy=fsdp, where each rank builds its quantized base before FSDP shards
            it: cpu (FSDP moves one unit at a time to the GPU, so no GPU holds the whole base; costs the 4-bit base
            in CPU memory on every rank) or device (as under DDP: the whole base must fit one GPU).
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
        quantized_outputs: str = "input",
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
        self.adapter_path = adapter_path
        from_path = adapter is None and adapter_path is not None
        self.adapter = load_adapter_config(adapter_path) if from_path else adapter
        self.config = RunConfig(
            adapter=self.adapter, adapter_path=adapter_path, adapter_from_path=from_path, quantization=quantization,
            compute_dtype=compute_dtype, dtype=dtype, quant_storage=quant_storage,
            gradient_checkpointing=gradient_checkpointing, upcast_norms=upcast_norms,
            upcast_embeddings=upcast_embeddings, quantized_outputs=quantized_outputs, loss=loss, compile=compile,
            compile_scope=compile_scope, compile_dequantize=compile_dequantize, fsdp_load_on=fsdp_load_on)
        resolve_plan(self.config)  # what the configuration alone makes impossible fails here, before any weight
        self.plan: Optional[RunPlan] = None  # resolved with the trainer's facts in `setup`
        self.compile_options = compile_options
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.generation = generation or Generation()
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        # Plain data only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "base_model": base_model, "quantization": quantization, "compute_dtype": compute_dtype, "dtype": dtype,
            "adapter": adapter_to_dict(self.adapter), "adapter_path": adapter_path,
            "gradient_checkpointing": gradient_checkpointing, "loss": loss})
        self.model: Optional[torch.nn.Module] = None
        self.checkpoint_content = CheckpointContent()
        self.strict_loading = False  # checkpoints hold trainable tensors only (checked in on_load_checkpoint)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.accumulator = TokenMeanAccumulator()

    @property
    def method(self) -> str:
        return method_name(self.adapter)

    # ----------------------------------------------------------------------------------- plan and model
    def setup(self, stage: str) -> None:
        """Resolve the run plan: the trainer and the data module are known here, and no weight has loaded yet."""
        self.plan = self.resolve_plan(self._trainer, getattr(self._trainer, "datamodule", None), stage == "fit")
        for warning in self.plan.warnings:
            rank_zero_warn(warning)

    def resolve_plan(self, trainer: Any = None, datamodule: Any = None, fitting: Optional[bool] = None) -> RunPlan:
        """The plan of this configuration on `trainer` with `datamodule`'s packing (`plan.resolve_plan`)."""
        return resolve_plan(with_data(self.config, datamodule), trainer_facts(trainer, fitting))

    def configure_model(self) -> None:
        """Build the model the plan describes, on this rank's device (once)."""
        if self.model is not None:
            return
        if self.plan is None:  # configure_model without setup (a module used outside a trainer's loop)
            self.plan = self.resolve_plan(self._trainer)
        if self.plan.total_steps is not None:
            # the method's schedule is laid out over the run's optimizer steps, which only the trainer knows
            steps = optimizer_steps(self.trainer, f"model.adapter={self.method}")
            self.adapter = self.plan.total_steps(self.adapter, steps)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.model = build_model(self.plan, self.base_model, self.adapter, device, self.attn_implementation,
                                 self.trust_remote_code, self.compile_options)

    def trainable_names(self) -> list[str]:
        """State-dict keys of the trainable parameters (the checkpoint's content), without wrapper prefixes."""
        return trainable_names(self)

    # ----------------------------------------------------------------------------------- fit start
    def on_fit_start(self) -> None:
        self.model.train()
        trainable, total = count_parameters(self.model)  # packed 4-bit weights count as the weights they stand for
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": total}, step=0)
        self.print(f"adapter {self.method}: {trainable:,} trainable of {total:,} parameters "
                   f"({100 * trainable / max(total, 1):.3f} %)")

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode, and Lightning keeps modules' modes: without this, dropout and
        # gradient checkpointing would silently be off during training (on_fit_start sets it too, before
        # Lightning's check for modules left in eval mode; the sanity validation restores it)
        self.model.train()
        self.checkpoint_content.restore_rng()  # resumed: draw the dropout masks an unbroken run draws

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
        if self.plan.loss == "standard":
            loss = self(**batch, num_items_in_batch=n_supervised.clamp(min=1)).loss
        else:  # the same value without full logits (`fused_loss.py`)
            inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and k != "labels"}
            loss = supervised_loss(self.model, inputs, batch["labels"], self.plan.loss)
        return loss, n_supervised

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

    # ----------------------------------------------------------------------------------- optimizer
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
            scheduler.set_total_steps(optimizer_steps(self.trainer, f"model.lr_scheduler ({type(scheduler).__name__})"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        if gradient_clip_val and self.plan is not None and self.plan.clip_with_fsdp:
            # Lightning's FSDP precision refuses norm clipping (`trainer.gradient_clip_val`, QLoRA's 0.3); FSDP's
            # own clip_grad_norm_ computes the norm over every rank's shard, which is what clipping by norm means
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._accumulates():
            mean = self.accumulator.finish(optimizer, self.trainer.accumulate_grad_batches)
            if mean is not None:
                self.log("train/loss", mean, prog_bar=True)

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

    # ----------------------------------------------------------------------------------- checkpoints
    def _identity(self) -> dict[str, Any]:
        """What the checkpoint's tensors belong to (checked when it is loaded)."""
        return {"base_model": self.base_model, "quantization": self.quantization,
                "adapter": adapter_to_dict(self.adapter)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable tensors and record what they belong to (`checkpoint.CheckpointContent.save`)."""
        self.checkpoint_content.save(checkpoint, self._identity(), self.trainable_names())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another adapter or base, saying what differs (`CheckpointContent.load`)."""
        trainer = self._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        fitting = trainer is not None and trainer.state.fn == "fit"
        self.checkpoint_content.load(checkpoint, self._identity(), self.trainable_names(), world, rank, fitting)
