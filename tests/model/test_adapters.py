"""Every supported (method, quantization) cell of the compatibility table, on the tiny 2-layer LLaMA.

One test per cell, parametrized over `compat.METHODS` x `compat.QUANT_COLUMNS` (a new row is tested by adding
it): the method's own YAML is loaded as the CLI loads it, a few optimizer steps run through QPeftModule's
training step, and the test checks that
- the loss is finite, some trainable tensor changed and no frozen tensor (base weights, packed 4-bit bytes,
  buffers) changed;
- before the first step, identity methods give the bare base's logits (|Δ| < 1e-4) and the others do not;
- the export (the callback's `export_model`) reloads in plain peft on a fresh base with the same logits
  (|Δ| < 1e-5), and `generate` runs;
- the logged parameter counts are consistent: trainable = what requires grad, and the totals on quantized
  bases equal the unquantized one (packed 4-bit weights counted as weights).
No Lightning Trainer per cell (a few plain steps); AdaLoRA's Trainer hook has its own test.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_qpeft.callbacks.adapter_export import export_model, training_info
from lightning_qpeft.model import compat
from lightning_qpeft.model.counting import count_parameters
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.module import QPeftModule
from tests.conftest import cpu_trainer

# fields the tiny model needs instead of the YAML's (AdaLoRA's schedule must fit in 3 steps)
TINY_OVERRIDES = {"adalora": dict(tinit=0, tfinal=1, deltaT=1, total_step=3)}
STEPS = 3
IDENTITY_ATOL = 1e-4  # measured: 0 for LoRA-family, IA3, OFT, BOFT, VeRA; ~5e-6 for HRA and PiSSA's SVD
RELOAD_ATOL = 1e-5  # measured: 0, or ~3e-6 for AdaLoRA

SUPPORTED = [pytest.param(m.name, q, id=f"{m.name}-{q}") for m, q, c in compat.cells() if c.status is compat.Status.OK]
_totals: dict[str, tuple[int, int]] = {}  # method -> (trainable, total) on the first mode tested (none)


def adapter_config(method: str, base_model: str, **overrides):
    return compat.load_method_config(method, base_model=base_model, **{**TINY_OVERRIDES.get(method, {}), **overrides})


def module_for(method: str, quantization: str, base_model: str, **kw) -> QPeftModule:
    return QPeftModule(base_model, quantization=quantization, compute_dtype="float32", dtype="float32",
                       adapter=adapter_config(method, base_model), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                       **kw)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture(scope="module")
def base_logits(tiny_model_dir, batch):
    """The bare base's logits per quantization mode (loaded once per mode)."""
    cache: dict[str, torch.Tensor] = {}

    def get(quantization: str) -> torch.Tensor:
        if quantization not in cache:
            base = load_base_model(tiny_model_dir, quantization, compute_dtype="float32").eval()
            with torch.no_grad():
                cache[quantization] = base(input_ids=batch["input_ids"]).logits
        return cache[quantization]

    return get


def last(logits: torch.Tensor, n: int) -> torch.Tensor:
    return logits[:, -n:]  # prompt-learning methods return logits for their virtual tokens too


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return trainable, frozen


@pytest.mark.parametrize("method, quantization", SUPPORTED)
def test_supported_cell(method, quantization, tiny_model_dir, batch, base_logits, tmp_path):
    row = compat.METHODS[method]
    module = module_for(method, quantization, tiny_model_dir)
    module.configure_model()
    model = module.model
    n = batch["input_ids"].shape[1]

    module.eval()
    with torch.no_grad():
        start = last(module(**batch).logits, n)
    delta = (start - base_logits(quantization)).abs().max().item()
    if row.identity_at_init:
        assert delta < IDENTITY_ATOL, f"{method} should start as the base model (max |Δlogit| {delta:.2g})"
    else:
        assert delta > 1e-3, f"{method} is listed as not starting as the base, but |Δlogit| is {delta:.2g}"

    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    expected = _totals.setdefault(method, (trainable, total))
    assert (trainable, total) == expected, "counts must not depend on the quantization of the base"

    before, frozen = snapshot(model)
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(STEPS):
        loss, _ = module._step(batch)
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        loss.backward()
        optimizer.step()
        module.after_optimizer_step(step)
        optimizer.zero_grad()
    after, frozen_after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no trainable tensor changed"
    changed = [k for k in frozen if not torch.equal(frozen[k], frozen_after[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"

    module.eval()
    with torch.no_grad():
        trained = last(module(**batch).logits, n)
    size = export_model(model, tmp_path / "adapter", training_info(module))
    assert size > 0
    if isinstance(model, peft.PeftModel):
        fresh = load_base_model(tiny_model_dir, quantization, compute_dtype="float32")
        reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    else:  # full fine-tuning exports a whole model folder
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32).eval()
    with torch.no_grad():
        again = last(reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, n)
    torch.testing.assert_close(again, trained, rtol=0, atol=RELOAD_ATOL)

    eos = module.model.config.eos_token_id
    tokens = module.generate(batch["input_ids"], batch["attention_mask"], [eos], eos, max_new_tokens=3)
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 3


def test_there_are_supported_and_refused_cells():
    statuses = {c.status for _, _, c in compat.cells()}
    assert statuses == set(compat.Status)
    assert len(SUPPORTED) >= 80


def test_adalora_schedule_comes_from_the_trainer_and_ranks_are_reallocated(tiny_model_dir):
    from lightning_qpeft.data.datamodule import NLGDataModule

    module = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="float32",
                         adapter=compat.load_method_config("adalora", tinit=1, tfinal=1, deltaT=1),
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = NLGDataModule(tiny_model_dir, source_max_len=48, target_max_len=16, batch_size=4, max_train_records=40)
    cpu_trainer(max_steps=4, limit_val_batches=0).fit(module, data)
    assert module.adapter.total_step == 4  # trainer.estimated_stepping_batches, not the placeholder
    config = module.model.peft_config["default"]
    assert config.total_step == 4
    # the final allocation (step total - tfinal = 3) ran: peft recorded the kept ranks per matrix
    assert config.rank_pattern and all(len(mask) == config.init_r for mask in config.rank_pattern.values())
    kept = sum(sum(mask) for mask in config.rank_pattern.values())
    assert kept <= config.target_r * len(config.rank_pattern)


def test_adalora_schedule_that_does_not_fit_the_run_is_refused(tiny_model_dir):
    from lightning_qpeft.data.datamodule import NLGDataModule

    module = QPeftModule(tiny_model_dir, quantization="none", compute_dtype="float32",
                         adapter=compat.load_method_config("adalora"))  # tinit 100, tfinal 200
    data = NLGDataModule(tiny_model_dir, source_max_len=48, target_max_len=16, batch_size=4, max_train_records=40)
    with pytest.raises(ValueError, match=r"tinit=100 and tfinal=200.*this run has 5 optimizer steps"):
        cpu_trainer(max_steps=5, limit_val_batches=0).fit(module, data)
    assert module.model is None  # refused before the base loaded


def test_loftq_is_refused_before_loading(tmp_path):
    # it trains on CUDA, but its export does not load back into peft (docs/decisions/005-compat-refusals.md)
    with pytest.raises(ValueError, match=r"model.adapter=loftq cannot run with model.quantization=nf4: LoftQ trains "
                                         r"on CUDA, but .*does not load back"):
        QPeftModule(str(tmp_path / "missing"), quantization="nf4", adapter=compat.load_method_config("loftq"))


def test_prompt_learning_adapter_path_is_evaluation_only(tiny_model_dir, tmp_path):
    module = module_for("prompt_tuning", "none", tiny_model_dir)
    module.configure_model()
    export_model(module.model, tmp_path / "adapter")
    again = QPeftModule(tiny_model_dir, quantization="none", adapter_path=str(tmp_path / "adapter"))
    again.configure_model()  # loads for evaluation
    with pytest.raises(ValueError, match="model.adapter_path: prompt_tuning adapters load for evaluation only"):
        again.configure_optimizers()
