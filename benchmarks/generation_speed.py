"""Greedy decoding: our `test` against plain `model.generate`, on the same model, adapter, prompts and batch size.

On the device machine, from the repository root, with the SmolLM2 folder built (benchmarks/SMOLLM2.md) and
bench_data/smollm2/ carried:

    python benchmarks/generation_speed.py --out $OUT [--quantizations nf4-dq,bf16] [--hf-static]

What runs (each in its own process, so each starts with an empty GPU):
1. an adapter: configs/adapter/qlora.yaml (LoRA r=64 on every linear layer) on the model, its B matrices drawn
   from a seeded normal (std 0.02) so that it changes the answers, saved with peft's `save_pretrained`;
2. for each quantization: ours, `python -m lightning_qpeft test --config configs/smollm2/gpu.yaml` with that
   adapter (`model.adapter_path`) on SAMSum's 237 test dialogues: prompts batched by length (`plan_batches`),
   `data.eval_batch_size` a batch, bf16-mixed; its `test/generation_tokens_per_s` (answers' tokens up to and
   including their stop token, over the decoding time) and its answers (test_generations.jsonl); once with
   `model.generation.loop generate` (transformers' loop) and once with `loop static` (a static cache, the step
   replayed as a CUDA graph: model/static_decoding.py); with `--hf-static`, ours again on the bf16 base with
   `model.generation.cache static` (transformers compiles the decoding step for unquantized bases);
3. the peer for each quantization: the same model loaded as transformers and peft document it
   (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...), dtype=bfloat16)`,
   `PeftModel.from_pretrained`), plain `model.generate` over the same prompt ids in the split's order, in batches
   of the same size, left-padded, greedy, the same stop tokens and `max_new_tokens`.

Answers are compared text for text (bf16: rounding may decide a near tie differently; the count is reported).
Writes results.json and table.md under --out; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2" / "gpu.yaml"
PEER_FLAG = "--peer-run"


def ours(a: argparse.Namespace, adapter: Path, quant: str, extra: list[str], name: str) -> dict:
    run = Path(a.work) / name
    cmd = [sys.executable, "-m", "lightning_qpeft", "test", "--config", str(CONFIG), "--model.base_model",
           str(a.model), "--model.adapter", "null", "--model.adapter_path", str(adapter),
           *quant_flags(quant), "--data.path", str(a.train), "--data.test_path", str(a.test),
           "--data.eval_batch_size", str(a.batch), "--model.generation.max_new_tokens", str(a.max_new_tokens),
           "--trainer.default_root_dir", str(run), "--trainer.limit_test_batches", "1",
           "--trainer.enable_progress_bar", "false",
           *([f"--generation_metrics.max_records={a.max_records}"] if a.max_records else []), *a.ours_flags, *extra]
    rc, text, seconds = sh(cmd, a)
    row = {"run": name, "quantization": quant, "flags": " ".join(extra), "rc": rc, "wall_s": seconds}
    logs = sorted(run.glob("lightning_logs/version_*"))
    if rc == 0 and logs:
        from lightning_qpeft.callbacks.metrics_file import FILE_NAME, read_metrics

        metrics = {k: v[-1][1] for k, v in read_metrics(logs[-1] / FILE_NAME).items()}  # each metric's last value
        row.update(tokens_per_s=metrics.get("test/generation_tokens_per_s"), seconds=metrics.get("test/generation_s"),
                   stopped=metrics.get("test/stopped_fraction"), rougeL=metrics.get("test/rougeL"))
        lines = (logs[-1] / "test_generations.jsonl").read_text().splitlines()
        row["answers"] = [json.loads(x)["prediction"] for x in lines]
    else:
        row["error"] = text.strip().splitlines()[-15:]
    return row


def quant_flags(quant: str) -> list[str]:
    return (["--model.quantization", "none", "--model.dtype", "bfloat16"] if quant == "bf16"
            else ["--model.quantization", quant])


def peer(a: argparse.Namespace, adapter: Path, quant: str) -> dict:
    out = Path(a.work) / f"peer-{quant}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, PEER_FLAG, "--quant", quant, "--adapter", str(adapter), "--result", str(out),
           *forwarded(a)]
    rc, text, seconds = sh(cmd, a)
    row = {"run": "peer", "quantization": quant, "flags": "model.generate", "rc": rc, "wall_s": seconds}
    if rc == 0 and out.exists():
        row.update(json.loads(out.read_text()))
    else:
        row["error"] = text.strip().splitlines()[-15:]
    return row


def forwarded(a: argparse.Namespace) -> list[str]:
    return ["--model", str(a.model), "--train", str(a.train), "--test", str(a.test), "--batch", str(a.batch),
            "--max-new-tokens", str(a.max_new_tokens), "--work", str(a.work), "--out", str(a.out),
            *(["--max-records", str(a.max_records)] if a.max_records else [])]


def sh(cmd: list[str], a: argparse.Namespace) -> tuple[int, str, float]:
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(Path(a.out) / "generation_runs.log", "a") as f:
        f.write(f"----- {' '.join(cmd)} (rc {p.returncode}, {time.time() - t:.0f} s)\n{p.stdout}\n")
    print(f"{' '.join(cmd[1:4])} ...: rc {p.returncode} ({time.time() - t:.0f} s)", flush=True)
    return p.returncode, p.stdout, time.time() - t


def make_adapter(a: argparse.Namespace) -> Path:
    """LoRA r=64 on every linear layer with B drawn from N(0, 0.02) (seeded): an adapter that changes answers."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lightning_qpeft.model.adapters import load_adapter_yaml

    path = Path(a.work) / "adapter"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    model = get_peft_model(model, load_adapter_yaml(str(ROOT / "configs" / "adapter" / "qlora.yaml")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    return path


def peer_run(a: argparse.Namespace) -> None:
    """Plain transformers + peft generation (one process): the peer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_qpeft.cli import QPeftCLI
    from lightning_qpeft.core.tokens import cut_at_stop

    # our data module only for the prompt ids: the same tokens go to both sides
    cli = QPeftCLI(args=["--config", str(CONFIG), "--model.base_model", str(a.model), "--data.path", str(a.train),
                         "--data.test_path", str(a.test), "--trainer.accelerator", "cpu"], run=False)
    dm = cli.datamodule
    dm.setup("test")
    records = list(dm.prompts("test").with_format(None))[: a.max_records]
    quant = {"nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
             "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                       bnb_4bit_compute_dtype=torch.bfloat16),
             "int8": BitsAndBytesConfig(load_in_8bit=True), "bf16": None}[a.quant]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of this script only
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = PeftModel.from_pretrained(model, a.adapter).eval()
    pad = dm.tokenizer.pad_token_id
    answers, seconds, answered = [], 0.0, 0
    for start in range(0, len(records), a.batch):
        rows = [r["input_ids"] for r in records[start:start + a.batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens,
                                 do_sample=False, eos_token_id=list(dm.stop_ids), pad_token_id=pad)
        sync()
        seconds += time.perf_counter() - t
        new = out[:, width:]
        cut, ended = cut_at_stop(new, dm.stop_ids)
        answered += sum(len(r) for r in cut) + sum(ended)
        texts, _ = dm.decode(new)
        answers.extend(texts)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    Path(a.result).write_text(json.dumps({"tokens_per_s": answered / seconds, "seconds": seconds,
                                          "answers": answers, "peak_gib": peak}))


def table(rows: list[dict]) -> str:
    peers = {r["quantization"]: r for r in rows if r["run"] == "peer" and r.get("tokens_per_s")}
    lines = ["| run | quantization | decoding tokens/s | decoding s | vs peer | same answers as the peer | "
             "stopped | ROUGE-L |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = peers.get(r["quantization"])
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x" if p and r.get("tokens_per_s") else "-"
        same = "-"
        if p and r.get("answers") and r is not p:
            same = f"{sum(x == y for x, y in zip(r['answers'], p['answers']))} / {len(p['answers'])}"
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else f"failed (rc {r['rc']})"
        secs = f"{r['seconds']:.1f}" if r.get("seconds") else "-"
        stopped = f"{r['stopped']:.3f}" if r.get("stopped") is not None else "-"
        rouge = f"{r['rougeL']:.2f}" if r.get("rougeL") is not None else "-"
        lines.append(f"| {r['run']} | {r['quantization']} | {tps} | {secs} | {ratio} | {same} | {stopped} | {rouge} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "smollm2-135m-instruct")
    ap.add_argument("--train", type=Path, default=ROOT / "bench_data" / "smollm2" / "samsum_train.jsonl")
    ap.add_argument("--test", type=Path, default=ROOT / "bench_data" / "smollm2" / "samsum_test.jsonl")
    ap.add_argument("--quantizations", default="nf4-dq,bf16")
    ap.add_argument("--hf-static", action="store_true",
                    help="also ours with transformers' static cache (compiled decoding) on the bf16 base")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-records", type=int, help="the first N test prompts only (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/qpeft_generation")
    ap.add_argument("--no-peer", action="store_true", help="ours only (the peer needs CUDA)")
    ap.add_argument("--ours-flag", dest="ours_flags", action="append", default=[],
                    help="one more flag for our runs, repeatable (a CPU smoke run: "
                    "--ours-flag=--trainer.accelerator=cpu --ours-flag=--trainer.precision=32-true ...)")
    ap.add_argument(PEER_FLAG, action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quant", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_run:
        peer_run(a)
        return
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    adapter = make_adapter(a)
    rows = []
    for quant in [q for q in a.quantizations.split(",") if q]:
        if not a.no_peer:
            rows.append(peer(a, adapter, quant))
        rows.append(ours(a, adapter, quant, ["--model.generation.loop", "generate"], f"ours-{quant}"))
        rows.append(ours(a, adapter, quant, ["--model.generation.loop", "static"], f"ours-{quant}-static-loop"))
        if quant == "bf16" and a.hf_static:
            rows.append(ours(a, adapter, quant, ["--model.generation.cache", "static"], "ours-bf16-hf-static"))
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    text = (f"generation: {device}; torch {torch.__version__}; batch {a.batch}, max_new_tokens {a.max_new_tokens}; "
            f"{time.strftime('%Y-%m-%d')}; {time.time() - t0:.0f} s\n\n{table(rows)}\n")
    (Path(a.out) / "generation.json").write_text(json.dumps({"rows": rows, "table": text}, indent=1))
    (Path(a.out) / "generation.md").write_text(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
