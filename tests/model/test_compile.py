"""torch.compile of the decoder layers (`model.compile`, `model.compile_scope`): the same training as eager, one
graph for all layers, eager checkpointing's memory, and generation that does not recompile per layer."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_qpeft.base_models.tokenizer import load_tokenizer
from lightning_qpeft.model.module import QPeftModule
from tests.model.test_fused_loss import LORA, losses_of


def saved_activation_bytes(module, batch):
    """Bytes autograd keeps for backward in one training forward, parameters (and views of them) not counted."""
    params = {p.untyped_storage().data_ptr() for p in module.model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = module._step(batch)
    loss.backward()
    module.model.zero_grad(set_to_none=True)
    return total[0]


def fresh_module(tiny_model_dir, **kw):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = QPeftModule(tiny_model_dir, quantization="nf4-dq", compute_dtype="float32", **{"adapter": LORA, **kw})
    module.configure_model()
    module.model.train()
    return module


@pytest.mark.parametrize("scope", ["attention_mlp", "decoder_layer"])
def test_compiled_layers_train_the_same_share_one_graph_and_keep_checkpoint_memory(tiny_model_dir, batches, scope):
    # dropout inside the checkpointed layers: the recomputation must draw the forward's masks again
    lora = dataclasses.replace(LORA, lora_dropout=0.3)
    plain, _ = losses_of(tiny_model_dir, batches, steps=3, gradient_checkpointing=True, adapter=lora)
    eager_ckpt = saved_activation_bytes(fresh_module(tiny_model_dir, gradient_checkpointing=True, adapter=lora),
                                        batches[0])
    no_ckpt = saved_activation_bytes(fresh_module(tiny_model_dir, adapter=lora), batches[0])
    # aot_eager: AOTAutograd partitions forward and backward (and decides what the recomputation replays), as
    # with inductor on the GPU, without generating code
    module = fresh_module(tiny_model_dir, gradient_checkpointing=True, compile=True, compile_scope=scope,
                          compile_options={"backend": "aot_eager"}, adapter=lora)
    counters.clear()
    layers = module.model.get_base_model().model.layers
    checkpointed = []
    for i, layer in enumerate(layers):  # count the checkpoints: compiling must not bypass them
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, _i=i, _f=inner, **k: (checkpointed.append(_i), _f(fn, *a, **k))[1]
    graphs = []
    compiled, _ = losses_of(tiny_model_dir, batches, steps=3, module=module,
                            after_step=lambda: graphs.append(counters["stats"]["unique_graphs"]))
    assert compiled == pytest.approx(plain, rel=1e-5) and plain[1] != pytest.approx(plain[0], rel=1e-3)
    # every layer runs the same code: one graph serves them all (attention_mlp: one for attention, one for the
    # MLP), not one per layer, which would exceed Dynamo's recompile limit (8) on a 32-layer model and fall back
    # to eager
    assert len(layers) >= 2 and graphs[0] == (2 if scope == "attention_mlp" else 1)
    assert checkpointed == list(range(len(layers))) * 3  # every layer, every step, once
    # what backward keeps is what eager checkpointing keeps: the layers' inputs, not their activations
    compiled_bytes = saved_activation_bytes(module, batches[0])
    assert compiled_bytes <= 1.05 * eager_ckpt and compiled_bytes < 0.5 * no_ckpt


@pytest.mark.parametrize("scope", ["attention_mlp", "decoder_layer"])
def test_generation_with_compiled_layers_runs_eager_and_gives_the_same_tokens(tiny_model_dir, scope):
    ids = load_tokenizer(tiny_model_dir)(["hello world the"], return_tensors="pt")
    tokens = {}
    for compiled in (False, True):
        module = fresh_module(tiny_model_dir, gradient_checkpointing=True, compile=compiled, compile_scope=scope,
                              compile_options={"backend": "eager"})
        module.model.eval()
        counters.clear()
        with torch.no_grad():
            tokens[compiled] = module.model.generate(**ids, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(tokens[True], tokens[False])
    # with a KV cache the layers run eagerly: compiled, each layer's cache index would cost a recompilation
    # (8 layers' worth, then Dynamo gives up); the MLP (no cache) may keep a prefill and a one-token graph
    assert counters["stats"]["unique_graphs"] <= (2 if scope == "attention_mlp" else 0)


def test_compile_scope_is_checked_before_loading(tiny_model_dir):
    with pytest.raises(ValueError, match="model.compile_scope: 'model' is not one of attention_mlp, decoder_layer"):
        QPeftModule(tiny_model_dir, compile=True, compile_scope="model")
