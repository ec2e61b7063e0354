"""Random-weight models of real shapes, built quantized in memory: `model.base_model: random:llama-2-70b`.

For speed and memory benchmarks the weight values do not matter, only the shapes. Writing a 70B checkpoint
(140 GB in bf16) to disk and reading it back on every rank costs minutes of GPU time; here each rank builds
its model on the meta device, swaps the linear layers for bitsandbytes ones exactly as `from_pretrained`
does (`replace_with_bnb_linear`), and fills them layer by layer with random bf16 weights that bitsandbytes
quantizes on the device. Peak extra memory is one bf16 layer. Every rank draws the same weights (a fixed
seed per tensor), as if all had loaded one checkpoint.

`quantize_device` draws and quantizes each tensor on one device and keeps the result on another: under FSDP
the model is drawn and quantized on the GPU a tensor at a time and kept in CPU memory, so FSDP can move it to
the GPU one unit at a time (no GPU builds the whole model before sharding). The values are those of a build on
`quantize_device` (CUDA and CPU generators draw different numbers).

A random model has no tokenizer: give one with `model.tokenizer` (the data only needs token ids).
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, PreTrainedModel

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.base_models.folders import RANDOM_PREFIX

# Shapes of public LLaMA-family checkpoints (their config.json values).
SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama-2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
}


def random_config(name: str) -> LlamaConfig:
    shape = name[len(RANDOM_PREFIX):]
    if shape not in SHAPES:
        raise ConfigError("model.base_model", f"unknown random shape {shape!r}",
                          f"choose one of {', '.join(RANDOM_PREFIX + s for s in SHAPES)}")
    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _normal_(t: torch.Tensor, name: str, std: float) -> torch.Tensor:
    # the same values on every rank and in every run: a seed derived from the tensor's name
    gen = torch.Generator(device=t.device).manual_seed(zlib.crc32(name.encode()))
    return t.normal_(0.0, std, generator=gen)


@torch.no_grad()
def build_random_model(
    name: str,
    bnb: Optional[BitsAndBytesConfig],
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: Optional[str] = "sdpa",
    quantize_device: Optional[torch.device] = None,
) -> PreTrainedModel:
    """A model of the named shape with random weights, quantized per `bnb`, on `device`; drawn and quantized on
    `quantize_device` (default `device`), a tensor at a time."""
    import bitsandbytes as bnb_lib
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    config = random_config(name)
    config._attn_implementation = attn_implementation
    std = config.initializer_range
    draw_on = torch.device(quantize_device if quantize_device is not None else device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if bnb is not None:
        replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=bnb)
    for mod_name, module in model.named_modules():
        if isinstance(module, bnb_lib.nn.Linear4bit):
            w = _normal_(torch.empty(module.out_features, module.in_features, dtype=dtype, device=draw_on),
                         mod_name, std)
            weight = bnb_lib.nn.Params4bit(
                w, requires_grad=False, quant_type=bnb.bnb_4bit_quant_type,
                compress_statistics=bnb.bnb_4bit_use_double_quant, quant_storage=bnb.bnb_4bit_quant_storage,
                module=module,
            )._quantize(draw_on)
            # Params4bit.to moves its quant_state in place: module.quant_state (the same object) follows
            module.weight = weight if device == draw_on else weight.to(device)
        elif isinstance(module, bnb_lib.nn.Linear8bitLt):
            w = _normal_(torch.empty(module.out_features, module.in_features, dtype=torch.float16, device="cpu"),
                         mod_name, std)
            module.weight = bnb_lib.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
        else:
            for p_name, p in list(module.named_parameters(recurse=False)):
                full = f"{mod_name}.{p_name}"
                t = torch.empty(p.shape, dtype=dtype, device=draw_on)
                t = t.fill_(1.0) if "norm" in full else _normal_(t, full, std)
                setattr(module, p_name, torch.nn.Parameter(t.to(device), requires_grad=False))
    for mod_name, module in list(model.named_modules()):
        if mod_name.endswith("rotary_emb"):  # inv_freq is computed in __init__: build it again on the device
            with torch.device("cpu"):  # transformers 4.x takes device=, 5.x does not: build, then move
                model.set_submodule(mod_name, type(module)(config=model.config).to(device))
    for mod_name, module in model.named_modules():
        for b_name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                raise RuntimeError(f"random model: buffer {mod_name}.{b_name} left on the meta device")
    if bnb is not None:
        model.is_loaded_in_4bit = bool(bnb.load_in_4bit)
        model.is_loaded_in_8bit = bool(bnb.load_in_8bit)
        model.config.quantization_config = bnb
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()
