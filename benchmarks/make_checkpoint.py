"""Build the random-weight checkpoint the peer scripts measure (bf16, made on the GPU), with the LLaMA-2
tokenizer saved in the same folder, because our `--model.base_model` names the tokenizer too.

The weights come from the peer's own `make_checkpoint` (bench_data/peer_fixed_length.py), so the peer's
scripts and ours load the very same folder (`/tmp/ckpt-llama2-7b` is where peer_fixed_length.py looks).
Speed and memory do not depend on the weight values (../shared/reference/peers.md).

Usage: python benchmarks/make_checkpoint.py --peer-dir bench_data --tokenizer bench_data/llama2 --ckpt /tmp/ckpt-llama2-7b
"""

import argparse
import importlib.util
import os
import shutil
import time
from pathlib import Path


def load_peer_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-dir", required=True, type=Path, help="folder holding peer_fixed_length.py")
    ap.add_argument("--tokenizer", required=True, type=Path, help="folder holding the LLaMA-2 tokenizer.model")
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--shape", default="llama2-7b")
    a = ap.parse_args()
    t = time.time()
    if not (a.ckpt / "model.safetensors.index.json").exists() and not (a.ckpt / "model.safetensors").exists():
        peer = load_peer_module(a.peer_dir / "peer_fixed_length.py")
        tmp = a.ckpt.with_name(a.ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        peer.make_checkpoint(a.shape, str(tmp))  # LlamaConfig(SHAPES[shape]) on CUDA, bf16, save_pretrained
        shutil.rmtree(a.ckpt, ignore_errors=True)
        os.rename(tmp, a.ckpt)  # whole or absent: a killed build leaves no half folder at the final path
    if not (a.ckpt / "tokenizer_config.json").exists():
        from transformers import LlamaTokenizerFast

        # as peer_trainer.py loads it: the SentencePiece model converted to a fast tokenizer
        LlamaTokenizerFast.from_pretrained(str(a.tokenizer)).save_pretrained(str(a.ckpt))
    size = sum(f.stat().st_size for f in a.ckpt.iterdir()) / 2**30
    print(f"checkpoint {a.ckpt} ready ({size:.1f} GiB) in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
