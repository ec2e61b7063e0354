"""Load a base causal LM and its tokenizer from a hub id or a local folder, quantized per rank.

Config keys (on `QPeftModule`; the data module gets the tokenizer's from the same `model.base_model`):
    model.base_model:        hub id (`meta-llama/Llama-2-7b-hf`) or a local folder; a missing local folder whose
                             name is a built-in model (`checkpoints/tiny-llama`) is created on first use;
                             `random:<shape>` (e.g. random:llama-2-70b) builds random weights in memory; a
                             `.gguf` file is dequantized into a cached folder once (`gguf.py`), then loaded
                             and quantized like any folder
    model.tokenizer:         tokenizer folder or hub id when it is not the base model's (random: models)
    model.quantization:      see `quantization.py`
    model.dtype:             dtype of the weights that are not quantized (`auto` keeps the checkpoint's)
    model.attn_implementation: `sdpa` (default), `eager`, `flash_attention_2`, ...
    model.trust_remote_code: off unless you trust the folder's Python code (it would run on load)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lightning_qpeft.model.bnb_cpu import pin_cpu_kernels
from lightning_qpeft.model.gguf import gguf_folder, is_gguf
from lightning_qpeft.model.quantization import bnb_config, get_quant_mode, resolve_dtype
from lightning_qpeft.model.random_init import build_random_model, is_random
from lightning_qpeft.model.tiny import BUILTIN_MODELS

# the data module tokenizes with model.tokenizer, which is model.base_model unless set
TOKENIZER_KEY = "model.tokenizer (model.base_model unless set)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_REMOTE_CODE_HINT = ("; its code would run on load: set model.trust_remote_code=true only if you have read it "
                     "and trust it")
# encoder models that transformers also maps to a causal-LM class (a decoder head bolted on for generation)
NOT_DECODER_ONLY = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "rembert", "roformer",
                    "bert-generation", "data2vec-text", "xmod", "megatron-bert", "big_bird"}


def resolve_base_model(name_or_path: str, key: str = "model.base_model", need_config: bool = True) -> str:
    """The path or hub id to load; builds a built-in model folder on first use.

    Args:
        name_or_path: the config value.
        key: the config key it came from (for messages).
        need_config: a local folder must hold config.json (a tokenizer folder need not).
    """
    if is_random(name_or_path):
        return name_or_path
    if is_gguf(name_or_path):  # llama.cpp's file: dequantized into a cached model folder once
        return str(gguf_folder(name_or_path, key))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or (need_config and not (path / "config.json").exists()):
            raise ValueError(
                f"{key}: {str(path)!r} is not a model folder (no config.json in it); give a folder "
                "written by save_pretrained, or a hub id"
            )
        return str(path)
    if path.name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[path.name](path))
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{key}: no folder at {name_or_path!r}")
    return name_or_path  # a hub id: transformers resolves (and, with the hub, downloads) it


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token and right padding.

    LLaMA's tokenizer has no pad token. As QLoRA does for LLaMA, padding uses UNK (or EOS when there is no
    UNK): padded positions are excluded by the attention mask and masked from the labels by length, never
    by comparing ids, so the choice cannot leak into the loss.
    """
    if is_random(name_or_path):
        raise ValueError(f"model.tokenizer: {name_or_path} has random weights and no tokenizer; set model.tokenizer "
                         "to a tokenizer folder or hub id")
    path = resolve_base_model(name_or_path, TOKENIZER_KEY, need_config=False)
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(f"{TOKENIZER_KEY}: {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                         "set model.tokenizer to a folder or hub id that has one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{TOKENIZER_KEY}: cannot load a tokenizer from {path!r}: {_first_line(e)}"
                         f"{_REMOTE_CODE_HINT if 'trust_remote_code' in str(e) else ''}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"model.base_model: the tokenizer of {name_or_path!r} has no pad, UNK or EOS token")
    tokenizer.padding_side = "right"
    return tokenizer


def check_causal_lm(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before loading any weight, a model that is not a causal language model."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.base_model: cannot read the config of {name_or_path!r}: {_first_line(e)}"
                         f"{_REMOTE_CODE_HINT if 'trust_remote_code' in str(e) else ''}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ValueError(
            f"model.base_model: {name_or_path!r} is a {config.model_type!r} model, not a causal language model "
            f"(architectures: {config.architectures}); give a LLaMA-family (decoder-only) model"
        )
    if config.model_type in NOT_DECODER_ONLY:
        raise ValueError(
            f"model.base_model: {name_or_path!r} is a {config.model_type!r} model, whose causal-LM head is an "
            "encoder's add-on, not a decoder-only language model; give a LLaMA-family (decoder-only) model"
        )


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
        raise ValueError(f"model.base_model: cannot load the weights of {path!r}: {_first_line(e)}") from e
    model.config.use_cache = False  # training; generation turns it on per call
    pin_cpu_kernels(model)
    return model
