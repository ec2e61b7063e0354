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
from peft import AdaLoraConfig, BOFTConfig, IA3Config, VeraConfig
from torchmetrics import MeanMetric

from lightning_qpeft.base_models.folders import resolve_base_model
from lightning_qpeft.checkpointing import rng_states, set_rng_states
from lightning_qpeft.core.tensors import all_finite
from lightning_qpeft.core.tokens import IGNORE_INDEX
from lightning_qpeft.distributed import check_flattenable, fsdp_param_dtype, global_token_mean
from lightning_qpeft.model import compat
from lightning_qpeft.model.accumulation import TokenMeanAccumulator, world_tokens
from lightning_qpeft.model.adapters import (
    AdapterConfig,
    adapter_to_dict,
    attach_adapter,
    load_adapter_config,
    method_name,
    with_total_steps,
)
from lightning_qpeft.model.counting import count_parameters
from lightning_qpeft.model.fused_loss import (
    causal_lm_of,
    check_loss_name,
    linear_cross_entropy,
    output_layer,
    resolve_loss,
    supervised_hidden,
)
from lightning_qpeft.model.generation import Generation, generate
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.preparation import check_compile_scope, compile_layers, prepare_base
from lightning_qpeft.model.quantization import get_quant_mode, resolve_dtype
from lightning_qpeft.model.schedules import needs_total_steps
from lightning_qpeft.model.traced_dequant import set_traced_dequantize

# batch keys that go to the model's forward; the rest (metadata for generation) stays out
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def _clean_name(name: str) -> str:
    # FSDP (use_orig_params) and activation checkpointing insert wrapper modules into parameter names
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


# adapters whose trainable tensors sit in their decoder layer's FSDP unit (measured with check_flattenable over
# configs/adapter: IA3's and VeRA's vectors, AdaLoRA's factors, BOFT's rotations)
FSDP_UNFLATTENABLE = (IA3Config, VeraConfig, AdaLoraConfig, BOFTConfig)


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
        # Refuse bad values now, before any weight is loaded.
        get_quant_mode(quantization)
        check_loss_name(loss)
        resolve_dtype(compute_dtype, "model.compute_dtype")
        if dtype != "auto":
            resolve_dtype(dtype, "model.dtype")
        self.base_model = base_model
        self.tokenizer_name = tokenizer or base_model
        self.quantization = quantization
        self.compute_dtype = compute_dtype
        self.dtype_name = dtype
        self.quant_storage = quant_storage
        if adapter is not None and adapter_path is not None:
            raise ValueError("model.adapter and model.adapter_path: set one (a new adapter, or a trained one)")
        self.adapter_path = adapter_path
        self._rng_to_restore: Optional[dict[str, Any]] = None  # set by on_load_checkpoint, applied at train start
        self.adapter = load_adapter_config(adapter_path) if adapter_path is not None else adapter
        # the compatibility table refuses impossible combinations here, before any weight loads
        compat.check(self.adapter, quantization, gradient_checkpointing, quant_storage, dtype,
                     upcast_norms=upcast_norms, compute_dtype=compute_dtype)
        self.gradient_checkpointing = gradient_checkpointing
        self.upcast_norms = upcast_norms
        self.upcast_embeddings = upcast_embeddings
        self.loss = loss
        if loss != "standard" and self.adapter is not None and getattr(self.adapter, "is_prompt_learning", False):
            raise ValueError(f"model.loss: {loss} calls the decoder directly, which skips the virtual tokens of "
                             f"{method_name(self.adapter)}; use model.loss: standard")
        self.use_compile = compile  # not self.compile: that is nn.Module.compile
        self.compile_options = compile_options
        check_compile_scope(compile_scope)
        self.compile_scope = compile_scope
        if compile_dequantize and not compile:
            raise ValueError("model.compile_dequantize: true changes what torch.compile traces; it needs "
                             "model.compile: true")
        self.compile_dequantize = compile_dequantize
        self.loss_impl = "standard"  # what model.loss resolves to on this run's device (configure_model)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.generation = generation or Generation()
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        if fsdp_load_on not in ("cpu", "device"):
            raise ValueError(f"model.fsdp_load_on: {fsdp_load_on!r}; choose cpu or device")
        self.fsdp_load_on = fsdp_load_on
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
    def configure_model(self) -> None:
        """Load this rank's base onto this rank's device and attach the adapter (once)."""
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        quant_storage, upcast_norms = self._storage_for_strategy()
        if quant_storage != self.quant_storage:  # "auto" resolved (a float dtype under FSDP): check it again
            compat.check(self.adapter, self.quantization, self.gradient_checkpointing, quant_storage, self.dtype_name,
                         upcast_norms=upcast_norms, compute_dtype=self.compute_dtype)
        compat.check_device(self.adapter, self.quantization, device)
        if isinstance(self.adapter, AdaLoraConfig) and self.adapter_path is None and self._fitting():
            # AdaLoRA's rank schedule is laid out over the run's optimizer steps, which only the trainer knows
            self.adapter = with_total_steps(self.adapter, self._total_steps(f"model.adapter={self.method}"))
        # under FSDP (fsdp_load_on: cpu) the base waits in CPU memory: FSDP moves each unit to `device` as it
        # wraps and shards it, so the GPU holds the shards and one unit, never the whole base
        on_cpu = self._under_fsdp() and self.fsdp_load_on == "cpu" and device.type != "cpu"
        base = load_base_model(
            self.base_model,
            quantization=self.quantization,
            compute_dtype=self.compute_dtype,
            dtype=self.dtype_name,
            quant_storage=quant_storage,
            device=torch.device("cpu") if on_cpu else device,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            quantize_device=device,
        )
        self._warn_fp16_with_4bit()
        base = prepare_base(base, self.gradient_checkpointing, upcast_norms, self.upcast_embeddings)
        path = resolve_base_model(self.base_model)
        base_path = path if Path(path).is_dir() else None  # LoftQ reads the unquantized weights from here
        self.model = attach_adapter(base, self.adapter, self.adapter_path, base_path=base_path)
        if self._under_fsdp():
            check_flattenable(self.model, self.method)
        self.loss_impl = resolve_loss(self.loss, device)
        if self.loss_impl != "standard":
            output_layer(causal_lm_of(self.model), self.loss)  # refuse a head the fused loss would get wrong
        compiles = self._compiles()
        # process-wide (inductor's decomposition table): set by every module, so none inherits another's
        set_traced_dequantize(compiles and self.compile_dequantize)
        if compiles:
            n = compile_layers(self.model, self.compile_options, self.compile_scope)
            what = "attention and MLP modules" if self.compile_scope == "attention_mlp" else "decoder layers"
            rank_zero_info(f"model.compile: {n} {what} compiled (options {self.compile_options or {}}"
                           + ("; 4-bit dequantization traced" if self.compile_dequantize else "") + ")")

    def _under_fsdp(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def _compiles(self) -> bool:
        """Whether `model.compile` applies to this run: not under FSDP, where the compiled layers would sit inside
        FSDP's units, a pairing neither tested nor measured here (configs/llama2-7b compiles by default, and the
        same config must run under `--trainer.strategy fsdp` unchanged): that run is eager, with a warning."""
        if self.use_compile and self._under_fsdp():
            rank_zero_warn("model.compile: not applied under trainer.strategy=fsdp (compiled layers inside FSDP "
                           "units are untested here); this run is eager")
            return False
        return self.use_compile

    def _storage_for_strategy(self) -> tuple[str, bool]:
        """(quant_storage, upcast_norms) for this run's strategy; refuses what FSDP cannot shard correctly."""
        if not self._under_fsdp():
            return ("uint8" if self.quant_storage == "auto" else self.quant_storage), self.upcast_norms
        mode = get_quant_mode(self.quantization)
        if mode.bits == 8:
            raise ValueError(
                "model.quantization=int8 cannot run with trainer.strategy=fsdp: FSDP shards float tensors only and "
                "int8 weights are integers; use nf4/nf4-dq/fp4 (4-bit storage is made float) or trainer.strategy=ddp"
            )
        if isinstance(self.adapter, FSDP_UNFLATTENABLE):
            # what check_flattenable finds once the model is built, said before a weight loads
            raise ValueError(
                f"model.adapter={self.method} cannot run with trainer.strategy=fsdp: its float32 tensors live inside "
                "the decoder layers' FSDP units beside the bfloat16 base, and FSDP flattens a unit into one dtype; "
                "use trainer.strategy=ddp, or an adapter made of layers (lora, prompt_tuning)")
        param_dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
            fsdp_param_dtype(str(self.trainer.precision))
        )
        if mode.is_4bit and param_dtype is None:
            raise ValueError(
                f"trainer.precision={self.trainer.precision} cannot run a 4-bit base with trainer.strategy=fsdp: FSDP "
                "would cast the packed 4-bit weights to float32 and corrupt them; use bf16-mixed"
            )
        if mode.is_4bit and self.quant_storage not in ("auto", param_dtype):
            raise ValueError(
                f"model.quant_storage={self.quant_storage} cannot run with trainer.strategy=fsdp at "
                f"trainer.precision={self.trainer.precision}: it must be {param_dtype} (or auto)"
            )
        # one dtype per FSDP flat parameter: norms stay in the weights' dtype
        return (param_dtype if mode.is_4bit else "uint8"), False

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    def setup(self, stage: str) -> None:
        # runs before configure_model: refuse what the data settings make impossible before weights load
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        compat.check(self.adapter, self.quantization, self.gradient_checkpointing, self.quant_storage,
                     self.dtype_name, packing=bool(getattr(datamodule, "packing", False)),
                     upcast_norms=self.upcast_norms, compute_dtype=self.compute_dtype,
                     precision=str(self.trainer.precision) if self._trainer is not None else "")

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
        """Per-method work after optimizer step `step` (0-based), while the gradients are still there.

        AdaLoRA scores each rank's importance from weight x gradient and masks the least important ones
        (peft: "call update_and_allocate after backward and optimizer.step, before zero_grad").
        """
        if isinstance(self.adapter, AdaLoraConfig) and self.adapter_path is None:
            self.model.base_model.update_and_allocate(step)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        if gradient_clip_val and self._under_fsdp():
            # Lightning's FSDP precision refuses norm clipping (`trainer.gradient_clip_val`, QLoRA's 0.3); FSDP's
            # own clip_grad_norm_ computes the norm over every rank's shard, which is what clipping by norm means
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"trainer.gradient_clip_algorithm={gradient_clip_algorithm} cannot run with "
                                 "trainer.strategy=fsdp; use norm")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params and self.adapter_path is not None and self.adapter.is_prompt_learning:
            raise ValueError(
                f"model.adapter_path: {self.method} adapters load for evaluation only (peft cannot make a "
                "trained prompt-learning adapter trainable again); train a new one with model.adapter"
            )
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
            scheduler.set_total_steps(self._total_steps(f"model.lr_scheduler ({type(scheduler).__name__})"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self, what: str) -> int:
        """The run's optimizer steps, for schedules laid out over them; refused when the run has no end."""
        steps = self.trainer.estimated_stepping_batches
        if steps == float("inf"):
            raise ValueError(f"{what} is laid out over the run's optimizer steps, and this run has no set length: "
                             "set trainer.max_steps or trainer.max_epochs")
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
            raise ValueError("ckpt_path: not a lightning_qpeft checkpoint (no 'qpeft' entry)")
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
            raise ValueError("ckpt_path: the checkpoint does not match this configuration:\n  " + "\n  ".join(diffs))
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
