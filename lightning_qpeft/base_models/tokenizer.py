"""The base model's tokenizer, with a pad token and right padding: what the data module tokenizes with and what
generation and MMLU scoring decode with.

Config keys: `model.tokenizer` (a folder or hub id; `model.base_model` unless set), `model.trust_remote_code`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightning_qpeft.core.errors import ConfigError
from lightning_qpeft.base_models.folders import REMOTE_CODE_HINT, first_line, is_random, resolve_base_model

# the data module tokenizes with model.tokenizer, which is model.base_model unless set
TOKENIZER_KEY = "model.tokenizer (model.base_model unless set)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token and right padding.

    LLaMA's tokenizer has no pad token. As QLoRA does for LLaMA, padding uses UNK (or EOS when there is no
    UNK): padded positions are excluded by the attention mask and masked from the labels by length, never
    by comparing ids, so the choice cannot leak into the loss.
    """
    if is_random(name_or_path):
        raise ConfigError("model.tokenizer", f"{name_or_path} has random weights and no tokenizer",
                          "set model.tokenizer to a tokenizer folder or hub id")
    path = resolve_base_model(name_or_path, TOKENIZER_KEY, need_config=False)
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ConfigError(TOKENIZER_KEY, f"{path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                          "set model.tokenizer to a folder or hub id that has one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(TOKENIZER_KEY, f"cannot load a tokenizer from {path!r}: {first_line(e)}"
                          f"{REMOTE_CODE_HINT if 'trust_remote_code' in str(e) else ''}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ConfigError("model.base_model", f"the tokenizer of {name_or_path!r} has no pad, UNK or EOS token")
    tokenizer.padding_side = "right"
    return tokenizer
