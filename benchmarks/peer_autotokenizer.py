"""The peer recipe (bench_data/peer_trainer.py, unchanged) on a model whose tokenizer is not LLaMA-2's.

The peer loads its tokenizer with `LlamaTokenizerFast`, which builds a SentencePiece-style LLaMA tokenizer even
from SmolLM2's byte-level BPE folder and splits text differently from the model's own tokenizer. Here that name
resolves to `AutoTokenizer` before the peer's module runs; everything else is the peer's code as it is.

Usage: python benchmarks/peer_autotokenizer.py PEER_TRAINER.py CKPT TOKENIZER DATA [peer_trainer.py options]
"""

import runpy
import sys

import transformers

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the peer sees its own command line
    transformers.LlamaTokenizerFast = transformers.AutoTokenizer
    runpy.run_path(script, run_name="__main__")
