"""The tiny offline LLaMA: random weights and a byte-level BPE tokenizer trained here, saved as an ordinary
Hugging Face model folder so that it loads through the same `from_pretrained` + `BitsAndBytesConfig` path as
a real checkpoint.

Nothing is downloaded. The tokenizer is trained with the `tokenizers` library on the built-in task's text and
the prompt templates, so prompts are a few dozen tokens, not hundreds of bytes. Like LLaMA's, it has BOS, EOS
and UNK but no pad token (the loader assigns one, as QLoRA does).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_qpeft.tasks.synthetic_e2e import tokenizer_corpus

# A few layers, hidden 128: about 1 M parameters, a fit in minutes on two CPU cores.
# initializer_range 1/sqrt(hidden) instead of LLaMA's 0.02: with 0.02 the frozen random LM head caps every
# logit near 2.5, so no adapter can push the loss below ~4.4 nats (measured); a pretrained head has no such cap.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=128**-0.5,
)
TINY_VOCAB = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=False
    )


def build_tiny_llama(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write the tiny LLaMA (config, random weights, tokenizer) to `path`; atomic: a folder appears whole or not.

    Args:
        path: the model folder to create.
        seed: seed of the random weights.
        **overrides: `LlamaConfig` fields replacing `TINY_LLAMA`'s.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **{**TINY_LLAMA, **overrides},
    )
    with torch.random.fork_rng():  # leave the caller's RNG where it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process (a DDP rank) finished first: keep its folder
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# Built-in models: a local path whose folder name is a key here, and which does not exist yet, is built on
# first use (e.g. `model.base_model: checkpoints/tiny-llama`).
BUILTIN_MODELS = {"tiny-llama": build_tiny_llama}
