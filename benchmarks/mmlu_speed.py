"""How fast the project scores MMLU: five-shot val (1,531 questions) on a Llama-2-7B-shape NF4 model, one GPU.

Random weights of the real shape stand in for the gated checkpoint (speed does not depend on the values; the
accuracy printed is therefore ~25 % and meaningless). The checkpoint is built on the GPU once and saved, then
loaded the project's way (`load_base_model`: from_pretrained + BitsAndBytesConfig, NF4 + double quant, bf16
compute), and scored by `MMLUEvaluator` exactly as the MMLU callback does: prompts sorted by length, batched by a
token budget, the four letter logits gathered at each row's last real token.

Usage, from the repository root, with no install of the project (needs torch, transformers, bitsandbytes):

    PYTHONPATH=. python benchmarks/mmlu_speed.py --tokenizer bench_data/llama2 \\
        --data data/mmlu/five_shot_mmlu_val.json [--batch_tokens 16384 32768 65536] [--padding right left]

(bench_data/llama2 holds a copy of ../shared/data/tokenizers/llama2/; `python -m lightning_qpeft fetch mmlu` builds
data/mmlu/five_shot_mmlu_val.json from the repository's CSVs.)

Prints one JSON line per setting: seconds, questions/s, prompt tokens/s, batches, padding fraction, peak memory,
accuracy; the first setting runs twice (a warm-up pass, then the timed one).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_qpeft.evaluation.mmlu import MMLUEvaluator
from lightning_qpeft.evaluation.mmlu_data import read_qlora_json
from lightning_qpeft.model.loading import load_base_model

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def make_checkpoint(path: str) -> None:
    """A random-weight Llama-2-7B in bf16, built on the GPU (seconds, not the minutes of a CPU init), as the peer's
    `make_checkpoint` builds it: an existing one (benchmarks/make_checkpoint.py's, same path) is used as it is."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B)).to(torch.bfloat16)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, path)  # whole or absent: a killed build leaves no half folder at the final path
    del model
    gc.collect()
    torch.cuda.empty_cache()


def load_llama2_tokenizer(folder: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # a folder holding only tokenizer.model, on a transformers that wants a config for Auto*
        from transformers import LlamaTokenizerFast

        tokenizer = LlamaTokenizerFast.from_pretrained(folder)
    if tokenizer.pad_token is None:  # as base_models.tokenizer.load_tokenizer does (it wants config.json)
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="folder with the LLaMA-2 tokenizer.model")
    ap.add_argument("--data", required=True, help="QLoRA's five_shot_mmlu_val.json")
    ap.add_argument("--checkpoint", default="/tmp/ckpt-llama2-7b", help="where the random checkpoint is kept")
    ap.add_argument("--quantization", default="nf4-dq")
    ap.add_argument("--batch_tokens", type=int, nargs="+", default=[32768])
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--padding", nargs="+", default=["right"], choices=["right", "left"])
    ap.add_argument("--max_samples", type=int, default=None)
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke run on an existing small --checkpoint")
    ap.add_argument("--compute_dtype", default="bfloat16")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    t = time.perf_counter()
    if cuda:
        make_checkpoint(args.checkpoint)
    build_s = time.perf_counter() - t
    tokenizer = load_llama2_tokenizer(args.tokenizer)
    items = read_qlora_json(args.data)[: args.max_samples]
    t = time.perf_counter()
    model = load_base_model(args.checkpoint, args.quantization, compute_dtype=args.compute_dtype, device=args.device)
    model.eval()
    load_s = time.perf_counter() - t
    print(json.dumps({"checkpoint_build_s": round(build_s, 1), "load_s": round(load_s, 1), "questions": len(items),
                      "device": torch.cuda.get_device_name(0) if cuda else args.device, "torch": torch.__version__,
                      "memory_after_load_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None}),
          flush=True)

    first = True
    for padding in args.padding:
        for budget in args.batch_tokens:
            t = time.perf_counter()
            evaluator = MMLUEvaluator(items, tokenizer, batch_tokens=budget, batch_size=args.batch_size,
                                      padding_side=padding)
            tokenize_s = time.perf_counter() - t
            if first:  # warm-up: CUDA context, kernels, bitsandbytes' first calls
                evaluator.evaluate(model, args.device)
                first = False
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            results = evaluator.evaluate(model, args.device)
            real = sum(len(x) for x in evaluator.encoded)
            padded = sum(len(b) * max(len(evaluator.encoded[i]) for i in b) for b in evaluator.batches)
            m = results.metrics()
            print(json.dumps({
                "padding": padding, "batch_tokens": budget, "batches": len(evaluator.batches),
                "seconds": round(results.seconds, 2), "questions_per_s": round(len(items) / results.seconds, 1),
                "prompt_tokens_per_s": round(real / results.seconds), "prompt_tokens": real,
                "padding_fraction": round(1 - real / padded, 4), "tokenize_s": round(tokenize_s, 2),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "accuracy": round(m["mmlu/accuracy"], 4), "accuracy_macro": round(m["mmlu/accuracy_macro"], 4),
                "k_histogram": results.report()["k_histogram"],
            }), flush=True)


if __name__ == "__main__":
    main()
