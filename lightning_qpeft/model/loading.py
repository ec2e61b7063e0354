"""Load a base causal LM from a hub id or a local folder, quantized per rank (its name is resolved, and its
tokenizer loaded, by `base_models/`).

Config keys (on `QPeftModule`; the data module gets the tokenizer's from the same `model.base_model`):
    model.base_model:        hub id (`meta-llama/Llama-2-7b-hf`) or a local folder; a missing local folder whose
                             name is a built-in model (`checkpoints/tiny-llama`) is created on first use;
                             `random:<shape>` (e.g. random:llama-2-70b) builds random weights in memory; a
                             `.gguf` file is dequantized into a cached folder once (`base_models/gguf.py`),
                             then loaded and quantized like any folder
    model.tokenizer:         tokenizer folder or hub id when it is not the base model's (random: models)
    model.quantization:      see `quantization.py`
    model.dtype:             dtype of the weights that are not quantized (`auto` keeps the checkpoint's)
    model.attn_implementation: `sdpa` (default), `eager`, `flash_attention_2`, ...
    model.trust_remote_code: off unless you trust the folder's Python code (it would run on load)
"""

from __future__ import annotations

from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.base_models.folders import REMOTE_CODE_HINT, first_line, is_random, resolve_base_model
from lightning_qpeft.model.bnb_cpu import pin_cpu_kernels
from lightning_qpeft.model.quantization import bnb_config, get_quant_mode, resolve_dtype
from lightning_qpeft.model.random_init import build_random_model

# encoder models that transformers also maps to a causal-LM class (a decoder head bolted on for generation)
NOT_DECODER_ONLY = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "rembert", "roformer",
                    "bert-generation", "data2vec-text", "xmod", "megatron-bert", "big_bird"}


def check_causal_lm(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before loading any weight, a model that is not a causal language model."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError("model.base_model", f"cannot read the config of {name_or_path!r}: {first_line(e)}"
                          f"{REMOTE_CODE_HINT if 'trust_remote_code' in str(e) else ''}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ConfigError("model.base_model", f"{name_or_path!r} is a {config.model_type!r} model, not a causal "
                          f"language model (architectures: {config.architectures})",
                          "give a LLaMA-family (decoder-only) model")
    if config.model_type in NOT_DECODER_ONLY:
        raise ConfigError("model.base_model", f"{name_or_path!r} is a {config.model_type!r} model, whose causal-LM "
                          "head is an encoder's add-on, not a decoder-only language model",
                          "give a LLaMA-family (decoder-only) model")


def load_base_model(
    name_or_path: str,
    quantization: str = "nf4-dq",
    compute_dtype: str = "bfloat16",
    dtype: str = "auto",
    quant_storage: str = "uint8",
    device: Optional[torch.device | str] = None,
    attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False,
    quantize_device: Optional[torch.device | str] = None,
) -> PreTrainedModel:
    """The base causal LM, quantized as `quantization` says, on one device (this rank's).

    `device_map={"": device}` puts every weight on this rank's device: `"auto"` would spread one model over
    all GPUs and run them one at a time, which is not data parallelism.

    `quantize_device` (random shapes only): where each tensor is drawn and quantized before it moves to
    `device` (under FSDP: quantized on the GPU, kept on the CPU). A checkpoint loaded onto the CPU is quantized
    there by bitsandbytes' CPU backend (transformers quantizes each weight on the device it loads it to).
    """
    path = resolve_base_model(name_or_path)
    mode = get_quant_mode(quantization)
    torch_dtype = "auto" if dtype == "auto" else resolve_dtype(dtype, "model.dtype")
    if mode.is_quantized and torch_dtype == "auto":
        # the non-quantized weights (embeddings, norms, lm_head) compute in the 4-bit compute dtype
        torch_dtype = resolve_dtype(compute_dtype, "model.compute_dtype")
    device = torch.device(device if device is not None else "cpu")
    if is_random(path):
        dt = torch.bfloat16 if torch_dtype == "auto" else torch_dtype
        model = build_random_model(path, bnb_config(mode, compute_dtype, quant_storage), dt, device,
                                   attn_implementation, quantize_device=quantize_device)
        model.config.use_cache = False
        pin_cpu_kernels(model)
        return model
    check_causal_lm(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb_config(mode, compute_dtype, quant_storage),
            dtype=torch_dtype,
            device_map={"": device},
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, SafetensorError) as e:  # missing or torn weight files; not CUDA errors (RuntimeError)
        raise ConfigError("model.base_model", f"cannot load the weights of {path!r}: {first_line(e)}") from e
    model.config.use_cache = False  # training; generation turns it on per call
    pin_cpu_kernels(model)
    return model
