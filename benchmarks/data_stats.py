"""Data statistics of a real instruction file: how much of each batch layout is padding (a benchmark, not a test).

    python benchmarks/data_stats.py [--path ../shared/data/instruction/alpaca/alpaca_5000.json]
        [--tokenizer ../shared/data/tokenizers/llama2] [--source_max_len 384] [--target_max_len 128]
        [--batch_size 16] [--max_tokens 4096]

Tokenizes the file exactly as training does (QLoRA's Alpaca prompt, prompt tokens masked, source/target caps)
through `NLGDataModule`, then reports records, tokens, supervised tokens, truncation, and for one whole epoch
of training batches the padding fraction of: padded batches in random order, padded batches with
`group_by_length`, packed rows (`packing`), and token-budget batches (`max_tokens`). Whole epochs, never a
window of first steps (length-grouped orders make the first steps unrepresentative).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("QPEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
if not SHARED.exists():
    SHARED = Path("/work/shared/data")


def layout_stats(dm, **settings) -> dict:
    """Padding and row sizes of one epoch of training batches under `settings` (data module attributes)."""
    for key, value in settings.items():
        setattr(dm, key, value)
    sampler = dm.train_sampler()
    stats = dm.statistics(sampler)
    from lightning_qpeft.data.datamodule import column

    lengths = column(dm.tokenized["train"], "length")
    batches = sampler.global_plan(0)
    row_tokens = [int(lengths[b].sum()) if dm.packing else len(b) * int(lengths[b].max()) for b in batches]
    return {
        "padding_fraction": round(stats["data/padding_fraction"], 4),
        "batches": len(batches),
        "records_per_batch": round(float(np.mean([len(b) for b in batches])), 2),
        "tokens_per_batch_mean": round(float(np.mean(row_tokens)), 1),
        "tokens_per_batch_max": int(max(row_tokens)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=str(SHARED / "instruction" / "alpaca" / "alpaca_5000.json"))
    parser.add_argument("--task", default="alpaca")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama2"))
    parser.add_argument("--source_max_len", type=int, default=384)
    parser.add_argument("--target_max_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=4096)
    parser.add_argument("--tokenizer_class", choices=("auto", "llama"), default="auto",
                        help="auto: AutoTokenizer (what the project loads); llama: LlamaTokenizerFast, as the peer "
                             "script loads a bare tokenizer.model (it puts no '▁' after <s>: 1 token more a record)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if not Path(args.path).exists() or not Path(args.tokenizer).exists():
        sys.exit(f"data_stats: {args.path} or {args.tokenizer} is missing (set QPEFT_SHARED_DATA)")

    from transformers import AutoTokenizer, LlamaTokenizerFast

    from lightning_qpeft.data.datamodule import NLGDataModule, column

    tokenizer = (AutoTokenizer if args.tokenizer_class == "auto" else LlamaTokenizerFast).from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token  # as load_tokenizer does (QLoRA: UNK)
    # all records train: no validation split, so the figures are the file's
    dm = NLGDataModule(args.tokenizer, task=args.task, path=args.path, val_path=args.path,
                       source_max_len=args.source_max_len, target_max_len=args.target_max_len,
                       batch_size=args.batch_size, seed=args.seed)
    dm.tokenizer = tokenizer
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    base = dm.statistics()
    lengths = column(dm.tokenized["train"], "length")
    supervised = column(dm.tokenized["train"], "n_supervised")
    report = {
        "file": args.path,
        "tokenizer": f"{args.tokenizer} ({type(tokenizer).__name__})",
        "source_max_len": args.source_max_len,
        "target_max_len": args.target_max_len,
        "records": base["data/records"],
        "records_dropped": base["data/records_dropped"],
        "records_truncated": base["data/records_truncated"],
        "tokens": base["data/tokens"],
        "mean_tokens": round(float(lengths.mean()), 2),
        "median_tokens": float(np.median(lengths)),
        "max_tokens_record": int(lengths.max()),
        "supervised_tokens": base["data/supervised_tokens"],
        "mean_supervised_tokens": round(float(supervised.mean()), 2),
        "layouts": {
            f"padded, batch {args.batch_size}, random order":
                layout_stats(dm, packing=False, group_by_length=False, max_tokens=None),
            f"padded, batch {args.batch_size}, group_by_length":
                layout_stats(dm, packing=False, group_by_length=True, max_tokens=None),
            f"packed, batch {args.batch_size} records a row":
                layout_stats(dm, packing=True, group_by_length=False, max_tokens=None),
            f"padded, max_tokens {args.max_tokens}, group_by_length":
                layout_stats(dm, packing=False, group_by_length=True, max_tokens=args.max_tokens),
            f"packed, max_tokens {args.max_tokens}":
                layout_stats(dm, packing=True, group_by_length=False, max_tokens=args.max_tokens),
        },
        "tokenize_seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        from lightning_qpeft.utils.atomic import atomic_file

        with atomic_file(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
