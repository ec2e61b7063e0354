"""model/generation.py: the decoding settings and one batch of continuations; a static KV cache gives the tokens
the dynamic one gives."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_qpeft.model.generation import Generation, generate
from lightning_qpeft.base_models.tokenizer import load_tokenizer


def test_a_static_cache_gives_the_dynamic_caches_tokens_in_fp32(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # prompts of different lengths: the left padding and its mask are part of what both caches must get right
    batch = tok(["hello world the", "a", "one two three four five six"], return_tensors="pt", padding=True)
    eos = model.config.eos_token_id
    out = {cache: generate(model, batch["input_ids"], batch["attention_mask"],
                           Generation(max_new_tokens=12, cache=cache), [eos], tok.pad_token_id)
           for cache in ("dynamic", "static")}
    assert out["dynamic"].shape == (3, 12)
    assert torch.equal(out["static"], out["dynamic"])
    assert Generation(cache="static").kwargs()["cache_implementation"] == "static"
    assert "cache_implementation" not in Generation().kwargs()


def test_an_unknown_cache_is_refused():
    with pytest.raises(ValueError, match="model.generation.cache: 'paged' is not one of dynamic, static"):
        Generation(cache="paged")


def _lora_on(model):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # an adapter that changes the answers
    return model.eval()


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_the_static_loop_gives_generates_tokens_in_fp32(tiny_model_dir, quantization):
    from lightning_qpeft.model.loading import load_base_model

    tok = load_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    model = _lora_on(load_base_model(tiny_model_dir, quantization, compute_dtype="float32", dtype="float32"))
    batch = tok(["hello world the", "a", "one two three four five six seven"], return_tensors="pt", padding=True)
    reference = generate(model, batch["input_ids"], batch["attention_mask"], Generation(max_new_tokens=16),
                         [model.config.eos_token_id], tok.pad_token_id)
    # a stop token the answers do produce: rows end at different steps and are padded after it
    stop = int(reference[0, 3])
    plain = generate(model, batch["input_ids"], batch["attention_mask"], Generation(max_new_tokens=16), [stop],
                     tok.pad_token_id)
    static = generate(model, batch["input_ids"], batch["attention_mask"],
                      Generation(max_new_tokens=16, loop="static"), [stop], tok.pad_token_id)
    assert static.shape == (3, 16)
    assert torch.equal(static[:, : plain.shape[1]], plain), (static, plain)
    assert (static[:, plain.shape[1]:] == tok.pad_token_id).all()
    assert (plain == stop).any(dim=1).sum() >= 1  # some row stopped: the stop bookkeeping was exercised


def test_the_static_loop_leaves_prompt_learning_to_generate(tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    from lightning_qpeft.model.static_decoding import supports

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert supports(base) and supports(_lora_on(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    prompt = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not supports(prompt)


def test_the_static_loop_refuses_sampling_and_beams():
    with pytest.raises(ValueError, match="loop=static decodes greedily"):
        Generation(loop="static", do_sample=True)
    with pytest.raises(ValueError, match="loop=static decodes greedily"):
        Generation(loop="static", num_beams=2)
