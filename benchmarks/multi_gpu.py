"""Several GPUs: DDP weak scaling and FSDP sharding of a quantized base, through the real CLI.

Run on the device machine from the repository root (after the wheels are installed: see qlora_speed.sh):

    python3 benchmarks/multi_gpu.py --out $OUT --tokenizer bench_data/llama2 \
        --runs ddp:1,ddp:2,ddp:4,fsdp:2,fsdp:4,fsdp70b:4

Each run is `python -m lightning_qpeft fit` on a random-weight Llama-2 shape built in memory on every rank
(`model.base_model: random:llama-2-7b`, no checkpoint on disk), NF4 + double quant, LoRA r=64 on every linear
layer, gradient checkpointing, fixed-length random tokens (8 x 512 a GPU: weak scaling, the same micro-batch
per GPU), bf16-mixed. The efficiency callback's perf.json gives global and per-GPU tokens/s, the peak memory
(max over ranks, loading included) and what stays resident once the model is set up (the FSDP shard).

Run names: `ddp:N` / `fsdp:N` on Llama-2-7B (eager, paged AdamW: how the first tables were measured), `ddpc:N`
on Llama-2-7B as the config of call K trains it (compiled decoder layers, torch AdamW; without the traced
dequantization the config now adds), `fsdp70b:N` on Llama-2-70B (micro-batch 4 x 512); `fsdpdev:N` and
`fsdp70bdev:N` build the base on the GPU before FSDP shards it (`model.fsdp_load_on: device`) instead of in CPU
memory. The table is printed last: tokens/s, per GPU, scaling vs the 1-GPU run, resident GiB per GPU once set
up, peak GiB per GPU of the set-up (loading and wrapping) and of the whole run.

`--extra '--efficiency.record_setup_memory true'` also copies rank 0's set-up allocation history
(`<run>-setup_memory_rank0.pickle`); `python3 benchmarks/memory_peak.py FILE` says what was live at its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "llama2-7b" / "qlora-alpaca.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]", "--trainer.limit_val_batches", "0",
         "--trainer.num_sanity_val_steps", "0", "--adapter_export.enabled", "false"]
PAGED = "{class_path: bitsandbytes.optim.PagedAdamW32bit, init_args: {lr: 0.0002, weight_decay: 0.0}}"
SHAPES = {"ddp": ("random:llama-2-7b", 8), "ddpc": ("random:llama-2-7b", 8), "fsdp": ("random:llama-2-7b", 8),
          "fsdpdev": ("random:llama-2-7b", 8), "fsdp70b": ("random:llama-2-70b", 4),
          "fsdp70bdev": ("random:llama-2-70b", 4)}


def command(name: str, devices: int, tokenizer: str, root: Path, steps: int, profile: int = 0) -> list[str]:
    """The `fit` command of one run: 4 warm-up steps, `profile` profiled ones, then steps - 4 measured."""
    kind = name.split(":")[0]
    base, batch = SHAPES[kind]
    strategy = "fsdp" if kind.startswith("fsdp") else "ddp"
    if strategy == "ddp" and devices == 1:
        strategy = "auto"
    # eager and with paged AdamW, as the first tables in RESULTS.md were measured; `ddpc` keeps the config's
    # compiled layers and torch AdamW, without the traced dequantization (as calls L and M measured it)
    pinned = (["--model.compile_dequantize", "false"] if kind == "ddpc" else
              ["--model.compile", "false", "--model.compile_dequantize", "false", "--model.optimizer", PAGED])
    # `...dev`: each rank builds the whole base on its GPU before FSDP shards it (how calls L-O measured FSDP)
    load_on = ["--model.fsdp_load_on", "device"] if kind.endswith("dev") else []
    return [sys.executable, "-m", "lightning_qpeft", "fit", "--config", str(CONFIG), *QUIET,
            "--model.base_model", base, "--model.tokenizer", tokenizer,
            *pinned, *load_on,
            "--data.task", "random-tokens", "--data.path", "null", "--data.train_on_source", "true",
            "--data.source_max_len", "384", "--data.target_max_len", "128", "--data.batch_size", str(batch),
            "--trainer.devices", str(devices), "--trainer.strategy", strategy,
            "--trainer.max_steps", str(steps + profile), "--efficiency.warmup_steps", "4", "--efficiency.window",
            str(steps - 4), "--efficiency.profile_steps", str(profile), "--trainer.default_root_dir", str(root)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a LLaMA-2 tokenizer folder (random models have none)")
    ap.add_argument("--runs", default="ddp:1,ddp:2,ddp:4,fsdp:2,fsdp:4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps after the warm-up "
                    "(torch.profiler, not measured): <out>/<run>-profile.txt")
    ap.add_argument("--work", default="/tmp/qpeft_multi")
    ap.add_argument("--timeout", type=int, default=300, help="seconds a run may take")
    ap.add_argument("--extra", default="", help="more CLI flags for every run, e.g. '--model.compile true'")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for run in a.runs.split(","):
        kind, n = run.split(":")
        root = Path(a.work) / run.replace(":", "-")
        cmd = command(run, int(n), a.tokenizer, root, a.steps if "70b" not in kind else max(8, a.steps // 2),
                      a.profile)
        cmd += shlex.split(a.extra)
        t0 = time.time()
        print(f"[{run}] {' '.join(cmd)}", flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout, env=env)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = 124, (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        (out / "runs.log").open("a").write(f"\n===== {run} rc={rc} ({time.time() - t0:.0f} s)\n{log}")
        perf = sorted(root.rglob("perf.json"))
        # --extra '--efficiency.record_setup_memory true': rank 0's set-up allocation history
        for snap in sorted(root.rglob("setup_memory_rank0.pickle"))[-1:]:
            shutil.copyfile(snap, out / f"{run.replace(':', '-')}-setup_memory_rank0.pickle")
        for prof in sorted(root.rglob("profile.txt"))[-1:]:
            shutil.copyfile(prof, out / f"{run.replace(':', '-')}-profile.txt")
        row = {"run": run, "gpus": int(n), "rc": rc, "wall_s": round(time.time() - t0)}
        if rc == 0 and perf:
            row.update(json.loads(perf[-1].read_text()))
        else:
            row["error"] = "\n".join(line for line in log.splitlines()[-40:] if line.strip())[-1500:]
        print(f"[{run}] rc={rc} in {row['wall_s']} s", flush=True)
        if "error" in row:
            print(row["error"], flush=True)
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: list[dict]) -> str:
    """The markdown table of RESULTS.md: per GPU against the 1-GPU run of the same kind, or for the 7B FSDP runs
    against ddp:1 (the unsharded speed)."""
    base = {r["run"].split(":")[0]: r for r in results if r.get("gpus") == 1 and "tokens_per_s" in r}
    lines = ["| run | GPUs | tokens/s (global) | tokens/s per GPU | per GPU vs 1 GPU | resident GiB/GPU | "
             "set-up peak GiB/GPU | peak GiB/GPU | MFU | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]

    def gib(value) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['run']} | {r['gpus']} | failed (rc {r['rc']}) | | | | | | | {r['wall_s']} |")
            continue
        kind = r["run"].split(":")[0]
        ref = base.get("ddp") if kind in ("fsdp", "fsdpdev") else base.get(kind)
        per = r["tokens_per_s"] / r["gpus"]
        scale = f"{per / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['run']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {per:,.0f} | {scale} | "
                     f"{gib(r.get('resident_memory_gib_at_train_start'))} | "
                     f"{gib(r.get('peak_memory_gib_at_train_start'))} | {gib(r.get('peak_memory_gib'))} | "
                     f"{r.get('mfu') or float('nan'):.3f} | {r['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
