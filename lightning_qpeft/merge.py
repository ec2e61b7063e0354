"""`python -m lightning_qpeft merge`: fold a trained adapter into its base and save a plain model folder.

    python -m lightning_qpeft merge --adapter_path RUN/adapter --output merged/ \
        [--base_model ID_OR_DIR] [--quantization auto] [--dtype bfloat16] [--device cpu]

The output is an ordinary transformers model folder (config, safetensors, tokenizer) that loads with
`AutoModelForCausalLM.from_pretrained` and needs neither peft nor bitsandbytes. It appears atomically.

Which base weights the adapter is merged into matters. Merging into the 4-bit weights is lossy (the merged
weight is quantized again), so the merge always goes into a freshly loaded *unquantized* base. The adapter
was trained against the dequantized quantized weights dequant(Q(W)), not against W: by default
(`--quantization auto`) the base is loaded with the quantization the adapter was trained with (read from the
`qpeft_training.json` the export writes) and dequantized to `--dtype`, so the merged model computes what the
trained model computed. `--quantization none` merges into the original weights W instead (what most QLoRA
recipes do; the model then differs from the trained one by the base's quantization error).

Methods that cannot merge (prompt learning: virtual tokens are no weight update; full fine-tuning: already a
model folder) are refused before anything loads, with the reason from the compatibility table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from lightning_qpeft.base_models.folders import resolve_base_model
from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.model import compat
from lightning_qpeft.model.adapters import TRAINING_FILE, load_adapter_config
from lightning_qpeft.model.loading import load_base_model
from lightning_qpeft.model.quantization import get_quant_mode, resolve_dtype
from lightning_qpeft.utils.atomic import atomic_dir


def merge(
    adapter_path: str,
    output: str,
    base_model: Optional[str] = None,
    quantization: str = "auto",
    dtype: str = "bfloat16",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> Path:
    """Merge a trained adapter into a freshly loaded, unquantized base and save it as a plain model folder.

    Args:
        adapter_path: the adapter folder (peft `save_pretrained` output, e.g. `<run>/adapter`).
        output: the merged model folder to write (replaced atomically if it exists).
        base_model: hub id or folder of the base; default: `base_model_name_or_path` of adapter_config.json.
        quantization: the quantization to load and dequantize the base with, so that the merged weights are
            the ones the adapter was trained against; `auto`: the one recorded in the adapter folder
            (`none` when nothing is recorded); `none`: the original unquantized weights.
        dtype: dtype of the merged weights (bfloat16, float16, float32).
        device: where to load and merge (cpu, cuda, cuda:1, ...).
        trust_remote_code: allow the base folder's own Python code to run.
    """
    folder = Path(adapter_path)
    if (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise ConfigError("merge --adapter_path", f"{adapter_path!r} is a complete model folder (full "
                          f"fine-tuning): {compat.METHODS['full'].merge}")
    config = load_adapter_config(adapter_path)
    reason = compat.merge_refusal(config)
    if reason:
        raise ConfigError("merge --adapter_path", f"{adapter_path!r} holds a {compat.lookup(config)[0]} adapter, "
                          f"which cannot be merged: {reason}")
    recorded = _recorded(folder)
    if quantization == "auto":
        quantization = recorded.get("quantization", "none")
    get_quant_mode(quantization)
    resolve_dtype(dtype, "merge --dtype")
    base_model = base_model or config.base_model_name_or_path or recorded.get("base_model")
    if not base_model:
        raise ConfigError("merge --base_model", f"{adapter_path!r} names no base model", "give --base_model")
    path = resolve_base_model(base_model)

    base = dequantized_base(path, quantization, dtype, device, trust_remote_code)
    merged = _merged(base, adapter_path)
    merged.config.use_cache = True  # the loader turns it off for training; a deployed model generates

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {"adapter_path": str(folder.resolve()), "base_model": base_model,
                      "dequantized_from": quantization, "dtype": dtype, "method": compat.lookup(config)[0]}
        (tmp / "qpeft_merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"merged {adapter_path} into {base_model} (dequantized from {quantization}, {dtype}) -> {output}")
    return Path(output)


def dequantized_base(base_model: str, quantization: str, dtype: str = "float32", device: str = "cpu",
                     trust_remote_code: bool = False) -> torch.nn.Module:
    """The base loaded with `quantization` and dequantized to `dtype`: the weights an adapter trained on that
    quantization saw (`none`: the original weights)."""
    torch_dtype = resolve_dtype(dtype, "merge --dtype")
    base = load_base_model(base_model, quantization=quantization, compute_dtype=dtype, dtype=dtype, device=device,
                           trust_remote_code=trust_remote_code)
    if get_quant_mode(quantization).is_quantized:
        base = base.dequantize(dtype=torch_dtype)
        # transformers leaves these flags set; peft reads them and refuses to merge IA3/AdaLoRA "in 4-bit"
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if hasattr(base, flag):
                setattr(base, flag, False)
    return base.to(torch_dtype)


def _merged(base: torch.nn.Module, adapter_path: str) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_path).merge_and_unload()


def _recorded(folder: Path) -> dict:
    try:
        return json.loads((folder / TRAINING_FILE).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ConfigError("merge --adapter_path", f"{folder / TRAINING_FILE} is not valid JSON ({e})") from None


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    CLI(merge, args=argv, as_positional=False)


if __name__ == "__main__":
    main()
