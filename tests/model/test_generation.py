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
