"""The fused (chunked) linear + cross-entropy equals the standard loss: as a function, in gradients, and over
optimizer steps of the tiny 4-bit model; refusals name model.loss."""

import dataclasses

import peft
import pytest
import torch
import torch.nn.functional as F

from lightning_qpeft.model import fused_loss
from lightning_qpeft.model.fused_loss import ChunkedLinearCrossEntropy, linear_cross_entropy, supervised_hidden
from lightning_qpeft.model.module import QPeftModule


def test_supervised_hidden_takes_the_position_before_each_label():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)  # value = 4*row + position
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 9, -100, -100]])
    h, y = supervised_hidden(hidden, labels)
    assert y.tolist() == [7, 8, 9]
    assert h.squeeze(1).tolist() == [1.0, 2.0, 4.0]  # row 0 positions 1, 2; row 1 position 0


@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_chunked_equals_cross_entropy_in_value_and_gradients(chunk_rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (10,), generator=g)
    ref = F.cross_entropy(F.linear(x, w, b), y)
    ref_grads = torch.autograd.grad(ref * 3.0, (x, w, b))
    ours = ChunkedLinearCrossEntropy.apply(x, w, b, y, 10.0, chunk_rows)
    grads = torch.autograd.grad(ours * 3.0, (x, w, b))  # a scaled upstream gradient reaches all three
    torch.testing.assert_close(ours, ref)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(ChunkedLinearCrossEntropy.apply(x, w, b, y, 10.0, chunk_rows), ref)


def test_frozen_head_gets_no_gradient_and_empty_selection_gives_zero():
    head = torch.nn.Linear(8, 20, bias=False).requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    loss = linear_cross_entropy(x, head, torch.randint(0, 20, (5,)), chunk_rows=2)
    loss.backward()
    assert x.grad is not None and head.weight.grad is None
    empty = linear_cross_entropy(x[:0], head, torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


LORA = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def losses_of(tiny_model_dir, batches, steps=3, module=None, after_step=lambda: None, **kw):
    """Losses of `steps` AdamW steps of the tiny 4-bit model with LoRA (or of `module`)."""
    if module is None:
        torch.manual_seed(0)  # the same LoRA initialisation for every path
        module = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32", **{"adapter": LORA, **kw})
        module.configure_model()
    module.model.train()
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for batch in batches[:steps]:
        loss, _ = module._step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
        after_step()
    return out, module


def test_fused_training_equals_standard_training(tiny_model_dir, batches):
    torch.manual_seed(0)
    module = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32", adapter=LORA, loss="fused")
    module.configure_model()
    assert module.plan.loss == "chunked"  # no liger on a CPU
    start = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    fused, _ = losses_of(tiny_model_dir, batches, module=module)
    with torch.no_grad():  # back to the same initial adapter, then the standard loss
        for n, p in module.model.named_parameters():
            if n in start:
                p.copy_(start[n])
    module.plan = dataclasses.replace(module.plan, loss="standard")
    plain, _ = losses_of(tiny_model_dir, batches, module=module)
    assert plain[2] < plain[0] - 0.5  # it trains, so equal losses at step 3 mean equal updates
    assert fused == pytest.approx(plain, rel=1e-5)


def test_upcast_embeddings_reproduces_prepare_model_for_kbit_training(tiny_model_dir):
    module = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="bfloat16", adapter=LORA,
                         upcast_embeddings=True)
    module.configure_model()
    base = module.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == base.lm_head.weight.dtype == torch.float32
    default = QPeftModule(tiny_model_dir, quantization="nf4", compute_dtype="bfloat16", adapter=LORA)
    default.configure_model()
    assert default.model.get_base_model().lm_head.weight.dtype == torch.bfloat16  # only the norms are fp32


def test_refusals_name_model_loss(tiny_model_dir, monkeypatch):
    with pytest.raises(ValueError, match="model.loss: unknown loss 'fast'"):
        QPeftModule(tiny_model_dir, loss="fast")
    with pytest.raises(ValueError, match="model.loss: fused calls the decoder directly"):
        QPeftModule(tiny_model_dir, loss="fused", adapter=peft.PromptTuningConfig(num_virtual_tokens=4,
                                                                                  task_type="CAUSAL_LM"))
    monkeypatch.setattr(fused_loss, "liger_available", lambda: False)
    with pytest.raises(ValueError, match="model.loss: liger needs liger-kernel"):
        QPeftModule(tiny_model_dir, loss="liger")
    monkeypatch.setattr(fused_loss, "liger_available", lambda: True)
    with pytest.raises(ValueError, match="model.loss: liger runs on CUDA only"):
        fused_loss.resolve_loss("liger", torch.device("cpu"))
    head_lora = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    module = QPeftModule(tiny_model_dir, compute_dtype="float32", loss="chunked", adapter=head_lora)
    with pytest.raises(ValueError, match="model.loss: chunked needs a plain nn.Linear LM head"):
        module.configure_model()


def test_liger_path_passes_weight_input_target_bias_in_one_dtype(monkeypatch):
    """liger's loss takes (weight, input, target, bias): a stand-in module checks the call on a CPU."""
    import sys
    import types

    calls = []

    class FakeLigerLoss(torch.nn.Module):
        def forward(self, weight, x, target, bias=None):
            calls.append((weight.dtype, x.dtype, None if bias is None else bias.dtype))
            return F.cross_entropy(F.linear(x.float(), weight.float(), None if bias is None else bias.float()),
                                   target)

    module = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyLoss = FakeLigerLoss
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.fused_linear_cross_entropy", module)
    head = torch.nn.Linear(8, 20).to(torch.bfloat16)
    x = torch.randn(5, 8)
    y = torch.randint(0, 20, (5,))
    loss = linear_cross_entropy(x, head, y, impl="liger")
    assert calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    expected = linear_cross_entropy(x.to(torch.bfloat16), head, y, impl="chunked")
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fused_loss.liger_available(), reason="CUDA + liger-kernel")
def test_liger_equals_chunked_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 256, device="cuda", generator=g, requires_grad=True)
    head = torch.nn.Linear(256, 32000, bias=False, device="cuda").to(torch.bfloat16).requires_grad_(False)
    y = torch.randint(0, 32000, (300,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = linear_cross_entropy(x, head, y, impl="liger")
        (ga,) = torch.autograd.grad(a, x)
        b = linear_cross_entropy(x, head, y, impl="chunked", chunk_rows=64)
        (gb,) = torch.autograd.grad(b, x)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ga.float(), gb.float(), rtol=2e-2, atol=1e-4)
