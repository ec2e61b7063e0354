"""Our `fit` against the peer QLoRA recipe, side by side on one GPU in one call; the last lines are the table.

On the device machine, from the repository root, with bench_data/ and .whl/ carried (benchmarks/RESULTS.md):

    bash benchmarks/qlora_speed.sh --out $OUT --suites real,fixed --variants default,fused --check real

What runs, in this order (each in its own process, so each starts with an empty GPU):
1. the random-weight Llama-2-7B checkpoint (bf16, built on the GPU by the peer's own make_checkpoint, the LLaMA-2
   tokenizer saved beside it): benchmarks/make_checkpoint.py; reused when it exists.
2. suite `real`: a seeded sample of `--records` Alpaca records (alpaca_5000.json), the Alpaca prompt masked,
   source <= 384 / target <= 128, NF4 + DQ, LoRA r=64 alpha 16 dropout 0.05 on all linear layers, 16 records an
   optimizer step. The peer (bench_data/peer_trainer.py --batch 16 --accum 1, group_by_length) and each of our
   variants train `--epochs` epochs of the sample (default 3) and are timed over all but the first: whole epochs
   hold the same records whatever the order (peers.md: a window of the peer's first steps is biased towards its
   longest records), and more than one of them averages out the host's moments (one config measured 3,891-5,293
   tokens/s in calls I-K on three machines; the peer 2,165-2,797).
3. suite `fixed`: 8 x 512 random tokens, every token supervised (labels = input ids): the peer's
   peer_fixed_length.py nf4-dq:1 (median of 8 steps after 3) and ours (`data.task: random-tokens`, mean of
   `--fixed-steps` steps after 3).
4. suite `small`: SmolLM2-135M-Instruct (`--small-model`, the folder `fetch smollm2-135m-instruct` writes) on
   `--small-records` SAMSum training dialogues as Alpaca instruction records (benchmarks/smollm2_data.py's split;
   instruction "Summarize this dialogue.", the dialogue as input, the summary as output), source <= 384 / target
   <= 128, 16 records a step: the peer (peer_trainer.py through benchmarks/peer_autotokenizer.py, which loads
   SmolLM2's own tokenizer) and our configs/smollm2/gpu.yaml with each of `--small-variants` (SMALL_PRESETS),
   timed over whole epochs after the first, as in `real`.
5. `--check real|fixed`: the same training. benchmarks/peer_reference.py trains the peer recipe for
   `--check-steps` steps on our batches from a saved LoRA init (dropout 0), our fit trains from the same init
   with the first variant's flags plus `model.upcast_embeddings=true` (the peer's fp32 embeddings and head);
   each step's loss must agree within 0.02 nats, and the adapters' updates must point the same way: the same
   steps trained in fp32 from the same init (`--check-fp32`, on by default) are the yardstick, and our update
   must be as close to it as the peer's bf16 update is (cosine, less 0.005; `against_fp32`); without it, cosine
   >= 0.99 between ours and the peer's. For `real` it also checks that our tokenization equals the peer's
   `build()` record for record.

Our runs go through the real CLI (`python -m lightning_qpeft fit --config configs/llama2-7b/qlora-alpaca.yaml`,
`--trainer.max_*`) and report from the efficiency callback's perf.json. Variants are extra CLI flags: presets
(`--variants plain,fused,...`, see PRESETS) or `--variant NAME='--model.loss fused --data.packing true'`.
`--budget-s` skips what would not finish in time (a device command gets 10 minutes). `--profile N` profiles N
steps of each of our runs just before its measured window (`efficiency.profile_steps`): where the GPU time
goes, by kernel category, and how long the GPU waits for the CPU.

Writes under --out: results.json (every number), table.md (the table), runs.log (every process's output),
profiles.txt (with --profile), pyspy.txt (with --pyspy: where the CPU time goes, benchmarks/pyspy_summary.py) and
each sampled run's raw stacks, pyspy-<run>.txt.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "llama2-7b" / "qlora-alpaca.yaml"
# configs/llama2-7b/qlora-alpaca.yaml compiles whole decoder layers with the 4-bit dequantization traced into
# them, pads to multiples of 16, groups by length and steps torch's multi-tensor AdamW (what measured fastest);
# the presets say every speed switch explicitly, so each keeps meaning what it measured when the config's
# defaults move.
EAGER = ["--model.compile", "false", "--data.pad_to_multiple_of", "null", "--data.group_by_length", "false"]
RANDOM_ORDER = ["--data.group_by_length", "false"]
BLOCKS = ["--model.compile", "true", "--model.compile_scope", "attention_mlp"]  # two graphs a layer
LAYER64 = ["--model.loss", "fused", "--model.compile", "true", "--model.compile_scope", "decoder_layer",
           "--data.pad_to_multiple_of", "64", "--data.group_by_length", "true"]
ADAMW = "{class_path: torch.optim.AdamW, init_args: {lr: 0.0002, weight_decay: 0.0, foreach: true}}"
PRESETS: dict[str, list[str]] = {
    "default": [],  # the config as it is
    "plain": ["--model.loss", "standard", *EAGER],  # the recipe as transformers computes its loss
    "fused": ["--model.loss", "fused", *EAGER],  # LM head + CE at supervised positions, chunked (liger on CUDA)
    "upcast": ["--model.loss", "standard", "--model.upcast_embeddings", "true", *EAGER],  # the peer's fp32 embed/head
    "packing": ["--model.loss", "fused", "--data.packing", "true", *EAGER],  # one padding-free row per micro-batch
    "grouped": ["--model.loss", "fused", *EAGER, "--data.group_by_length", "true"],  # the peer's length-grouped order
    "bf16-norms": ["--model.loss", "fused", "--model.upcast_norms", "false", *EAGER],  # bf16 activations (RESULTS)
    "compile": ["--model.loss", "fused", *BLOCKS, "--data.pad_to_multiple_of", "null", *RANDOM_ORDER],
    # compile, with padded lengths rounded up to 64: a few shapes (cuBLAS, Triton and compiled graphs reused)
    "compile64": ["--model.loss", "fused", *BLOCKS, "--data.pad_to_multiple_of", "64", *RANDOM_ORDER],
    "pad64": ["--model.loss", "fused", "--model.compile", "false", "--data.pad_to_multiple_of", "64", *RANDOM_ORDER],
    "grouped64": ["--model.loss", "fused", *BLOCKS, "--data.pad_to_multiple_of", "64", "--data.group_by_length", "true"],
    "layer64": LAYER64,  # whole decoder layers compiled (one graph a layer): the config's default in calls G-J
    "layer16": [*LAYER64, "--data.pad_to_multiple_of", "16"],  # 20 % padded positions instead of 32 % (call J)
    "no-ckpt": ["--model.loss", "fused", "--model.gradient_checkpointing", "false", *EAGER],
    "tokens4k": ["--model.loss", "fused", "--data.max_tokens", "4096", *EAGER],  # changes records per step
    # torch's multi-tensor AdamW instead of bitsandbytes' paged AdamW 32-bit, which synchronises the GPU after
    # each of the 448 LoRA tensors; the same update rule and fp32 states. Not `fused: true`: Lightning refuses
    # gradient clipping with an optimizer that unscales internally (RESULTS.md, calls E and F)
    "adamw": [*LAYER64, "--model.optimizer", ADAMW],
    "adamw16": [*LAYER64, "--model.optimizer", ADAMW, "--data.pad_to_multiple_of", "16"],  # the config from call K
    # bitsandbytes' dequantization traced into the layer graphs as torch ops (no Python dispatch per weight): the
    # config from call N
    "traced16": [*LAYER64, "--model.optimizer", ADAMW, "--data.pad_to_multiple_of", "16",
                 "--model.compile_dequantize", "true"],
}
# every other preset was measured with QLoRA's paged AdamW 32-bit (the config's optimizer until call K) and with
# bitsandbytes' ops opaque to the compiled graphs
PAGED = "{class_path: bitsandbytes.optim.PagedAdamW32bit, init_args: {lr: 0.0002, weight_decay: 0.0}}"
PRESETS = {name: flags if name == "default" else
           [*flags, *([] if "--model.optimizer" in flags else ["--model.optimizer", PAGED]),
            *([] if "--model.compile_dequantize" in flags else ["--model.compile_dequantize", "false"])]
           for name, flags in PRESETS.items()}
SMALL_CONFIG = ROOT / "configs" / "smollm2" / "gpu.yaml"
# the small suite's variants: the SmolLM2 recipe as it is, then one switch each
SMALL_PRESETS: dict[str, list[str]] = {
    "default": [],
    "bf16": ["--model.quantization", "none", "--model.dtype", "bfloat16"],  # the 16-bit base: NF4's cost
    "compile": ["--model.compile", "true", "--model.compile_scope", "decoder_layer",
                "--model.compile_dequantize", "true"],  # one graph a decoder layer, dequantization traced in
    "ckpt": ["--model.gradient_checkpointing", "true"],  # the peer's activation recomputation
    "autocast-outputs": ["--model.quantized_outputs", "autocast"],  # a 16-bit base's activation dtypes behind NF4
}
SMALL_INSTRUCTION = "Summarize this dialogue."
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]", "--trainer.limit_val_batches", "0",
         "--trainer.num_sanity_val_steps", "0"]


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.t0 = time.time()
        self.work = Path(a.work)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "runs.log", "a")
        args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        # checks: the verdicts; fp32: each bf16 run against the fp32 training (information, read by against_fp32)
        self.results: dict = {"runs": [], "checks": {}, "fp32": {}, "args": args}
        self.pyspy = find_pyspy() if a.pyspy else None
        if a.pyspy and not self.pyspy:
            print("--pyspy: no py-spy binary (pip install py-spy, or its wheel in .whl/): runs not sampled")

    def left(self) -> float:
        return self.a.budget_s - (time.time() - self.t0)

    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.0f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def sh(self, name: str, cmd: list[str], need_s: float = 60, sample: bool = False) -> tuple[int, str]:
        """Run one process, its output to runs.log; returns (exit code, output). Skipped without budget.
        `sample`: under py-spy (with --pyspy, if it names this run or is `all`), its summary appended to pyspy.txt."""
        if self.left() < need_s:
            self.say(f"{name}: skipped ({self.left():.0f} s of budget left, needs ~{need_s:.0f})")
            return -1, "skipped"
        self.say(f"{name}: " + (f"python -c <{len(cmd[2])} characters>" if cmd[1:2] == ["-c"] else shlex.join(cmd)))
        t = time.time()
        raw = self.out / ("pyspy-" + name.replace("/", "-") + ".txt")
        sample = sample and self.sampled(name)
        if sample:
            # --idle: also the samples where Python waits (a CUDA synchronisation, the GIL), so the shares add up
            # to the wall time. Sampling pauses the process: a sampled run's tokens/s is not a measurement (call
            # C: ours 2,117 sampled vs 2,136 unsampled in call B; the peer 1,890 vs 2,224-2,430 in other calls)
            cmd = [self.pyspy, "record", "--idle", "--rate", "100", "--format", "raw", "-o", str(raw), "--", *cmd]
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=max(self.left(), 10))
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = 124, (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + "\nTIMEOUT"
        self.log.write(f"----- {name} (rc {rc}, {time.time() - t:.0f} s)\n{text}\n")
        self.log.flush()
        status = "ok" if rc == 0 else f"FAILED rc={rc}:\n" + "\n".join(text.strip().splitlines()[-15:])
        self.say(f"{name}: {status} ({time.time() - t:.0f} s)")
        if sample and raw.exists():
            summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pyspy_summary.py"), str(raw),
                                      "--top", "40"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with open(self.out / "pyspy.txt", "a") as f:
                f.write(f"===== {name}\n{summary.stdout}\n")
            # the raw stacks, gzipped (call J's 4-epoch recording was too large to come back from the device)
            subprocess.run(["gzip", "-f", str(raw)], check=False)
        return rc, text

    def sampled(self, name: str) -> bool:
        """Whether `--pyspy` samples the run `name` ("real/ours-default", "real/peer")."""
        wanted = (self.a.pyspy or "").split(",")
        run = name.split("/")[-1]
        return bool(self.pyspy) and ("all" in wanted or run in wanted or run.removeprefix("ours-") in wanted)

    def python_json(self, name: str, code: str, tag: str, need_s: float) -> tuple[int, Optional[dict]]:
        """Run a `python -c` snippet that prints `TAG {json}`; returns (exit code, that JSON or None)."""
        rc, text = self.sh(name, [sys.executable, "-c", code], need_s=need_s)
        found = [line[len(tag) + 1:] for line in text.splitlines() if line.startswith(tag + " ")]
        return rc, json.loads(found[-1]) if found else None

    # --------------------------------------------------------------------------------------- set-up
    def environment(self) -> bool:
        code = ("import importlib, json, torch; mods = ['torch','transformers','peft','bitsandbytes','lightning',"
                "'datasets','jsonargparse','torchdata','pyarrow','fsspec','huggingface_hub','tokenizers']\n"
                "v = {m: getattr(importlib.import_module(m), '__version__', '?') for m in mods}\n"
                "try:\n import liger_kernel; from importlib.metadata import version; v['liger_kernel'] = "
                "version('liger-kernel')\nexcept ImportError: v['liger_kernel'] = None\n"
                "v['device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'\n"
                "import lightning.pytorch.cli, lightning_qpeft.cli\nprint('VERSIONS', json.dumps(v))")
        rc, versions = self.python_json("environment", code, "VERSIONS", need_s=0)
        if versions is not None:
            self.results["versions"] = versions
            self.say("versions: " + json.dumps(versions))
        return rc == 0

    def checkpoint(self) -> bool:
        rc, _ = self.sh("checkpoint", [sys.executable, "benchmarks/make_checkpoint.py", "--peer-dir",
                                       str(self.a.peer_dir), "--tokenizer", str(self.a.tokenizer), "--ckpt",
                                       str(self.a.ckpt)], need_s=30)
        return rc == 0

    def sample(self) -> Path:
        """A seeded sample of whole Alpaca records, a multiple of 16 so that epochs end on full steps."""
        records = json.loads(Path(self.a.alpaca).read_text())
        n = self.a.records - self.a.records % 16
        path = self.work / f"alpaca_{n}.json"
        path.write_text(json.dumps(random.Random(self.a.seed).sample(records, n)))
        return path

    def small_sample(self) -> Path:
        """The first `--small-records` SAMSum training dialogues (a multiple of 16) as Alpaca instruction records."""
        lines = Path(self.a.small_data).read_text().splitlines()
        rows = [json.loads(x) for x in lines if x.strip()]
        n = min(self.a.small_records, len(rows)) // 16 * 16
        path = self.work / f"samsum_alpaca_{n}.json"
        path.write_text(json.dumps([{"instruction": SMALL_INSTRUCTION, "input": r["dialogue"], "output": r["summary"]}
                                    for r in rows[:n]]))
        return path

    # --------------------------------------------------------------------------------------- runs
    def ours(self, suite: str, name: str, flags: list[str], data_args: list[str], steps: list[str],
             config: Path = CONFIG, ckpt: Optional[Path] = None) -> None:
        run_dir = self.work / f"{suite}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "lightning_qpeft", "fit", "--config", str(config),
               "--model.base_model", str(ckpt or self.a.ckpt), "--trainer.default_root_dir", str(run_dir),
               "--adapter_export.enabled", "false", *QUIET, *data_args, *steps, *flags]
        rc, _ = self.sh(f"{suite}/ours-{name}", cmd, need_s=self.a.min_run_s, sample=True)
        row = {"suite": suite, "run": f"ours-{name}", "flags": " ".join(flags), "rc": rc,
               "sampled": rc != -1 and self.sampled(f"{suite}/ours-{name}")}
        perf = run_dir / "lightning_logs" / "version_0" / "perf.json"
        if rc == 0 and perf.exists():
            p = json.loads(perf.read_text())
            row.update(tokens_per_s=p["tokens_per_s"], supervised_tokens_per_s=p["supervised_tokens_per_s"],
                       records_per_step=p["samples"] / max(p["measured_steps"], 1), peak_gib=p["peak_memory_gib"],
                       mfu=p["mfu"], hfu=p["hfu"], step_time=p["step_time"], pad_fraction=p["pad_fraction"],
                       model_flops_per_token=(p["model_flops"] / p["tokens"]) if p["model_flops"] else None,
                       peak_flops=p["peak_flops"], measured_steps=p["measured_steps"], tokens=p["tokens"],
                       samples=p["samples"], profile=p.get("profile"))
            prof = run_dir / "lightning_logs" / "version_0" / "profile.txt"
            if prof.exists():
                with open(self.out / "profiles.txt", "a") as f:
                    f.write(f"===== {suite}/ours-{name}: {' '.join(flags)}\n{prof.read_text()}\n")
        self.results["runs"].append(row)

    def peer_real(self, data: Path, epoch_steps: int, epochs: int) -> None:
        script = [str(self.a.peer_dir / "peer_trainer.py"), str(self.a.ckpt), str(self.a.tokenizer)]
        self._peer_trainer("real", script, data, epoch_steps, epochs, "(group_by_length)")

    def peer_small(self, data: Path, epoch_steps: int, epochs: int) -> None:
        model = str(self.a.small_model)  # SmolLM2's own tokenizer: benchmarks/peer_autotokenizer.py
        self._peer_trainer("small", ["benchmarks/peer_autotokenizer.py", str(self.a.peer_dir / "peer_trainer.py"),
                                     model, model], data, epoch_steps, epochs, "(AutoTokenizer)")

    def _peer_trainer(self, suite: str, script: list[str], data: Path, epoch_steps: int, epochs: int,
                      note: str) -> None:
        """peer_trainer.py on `data`, 16 records a step: the first epoch warms up, the others are timed."""
        out = self.work / f"peer_{suite}.jsonl"
        out.unlink(missing_ok=True)
        rc, _ = self.sh(f"{suite}/peer", [sys.executable, *script, str(data), "--batch", "16", "--accum", "1",
                                          "--warmup", str(epoch_steps), "--steps", str(epoch_steps * (epochs - 1)),
                                          "--out", str(out)],
                        need_s=self.a.min_run_s, sample=True)
        row = {"suite": suite, "run": "peer", "flags": f"peer_trainer.py --batch 16 --accum 1 {note}",
               "rc": rc, "sampled": rc != -1 and self.sampled(f"{suite}/peer")}
        if rc == 0 and out.exists():
            p = json.loads(out.read_text().splitlines()[-1])
            row.update(tokens_per_s=p["real_tokens_per_s"], supervised_tokens_per_s=p["supervised_tokens_per_s"],
                       records_per_step=p["batch"] * p["accum"], peak_gib=p["peak_gib"],
                       pad_fraction=p["pad_fraction"], samples_per_s=p["samples_per_s"])
        self.results["runs"].append(row)

    def peer_fixed(self) -> None:
        out = self.work / "peer_fixed.jsonl"
        out.unlink(missing_ok=True)
        # peer_fixed_length.py builds/reuses its checkpoint at /tmp/ckpt-<shape>: --ckpt must be that folder
        rc, _ = self.sh("fixed/peer", [sys.executable, str(self.a.peer_dir / "peer_fixed_length.py"), "llama2-7b",
                                       "--grid", "nf4-dq:1", "--batch", "8", "--seqlen", "512", "--out", str(out)],
                        need_s=self.a.min_run_s)
        row = {"suite": "fixed", "run": "peer", "flags": "peer_fixed_length.py nf4-dq:1 (8 x 512)", "rc": rc}
        if rc == 0 and out.exists():
            p = json.loads(out.read_text().splitlines()[-1])
            if "error" not in p:  # labels = input ids: 511 of every 512 tokens are predicted
                row.update(tokens_per_s=p["tokens_per_s"], supervised_tokens_per_s=p["tokens_per_s"] * 511 / 512,
                           records_per_step=p["batch"], peak_gib=p["peak_gib"], step_time=p["step_s"])
            else:
                row["rc"], row["error"] = 1, p["error"]
        self.results["runs"].append(row)

    # --------------------------------------------------------------------------------------- same training
    def tokens_match(self, data: Path) -> None:
        code = (
            "import importlib.util, json, sys\n"
            "from transformers import AutoTokenizer, LlamaTokenizerFast\n"
            "from lightning_qpeft.data.collate import tokenize_records\n"
            "from lightning_qpeft.tasks.templates import get_template\n"
            "from lightning_qpeft.base_models.tokenizer import load_tokenizer\n"
            f"spec = importlib.util.spec_from_file_location('peer_trainer', {str(self.a.peer_dir / 'peer_trainer.py')!r})\n"
            "peer = importlib.util.module_from_spec(spec); spec.loader.exec_module(peer)\n"
            f"recs = json.load(open({str(data)!r}))\n"
            f"tok = LlamaTokenizerFast.from_pretrained({str(self.a.tokenizer)!r}); tok.pad_token_id = 0\n"
            "theirs = peer.build(recs, tok)\n"
            f"ours_tok = load_tokenizer({str(self.a.ckpt)!r})\n"
            "cols = {k: [r.get(k) or '' for r in recs] for k in ('instruction', 'input', 'output')}\n"
            "ours = tokenize_records(cols, ours_tok, get_template('alpaca'), 384, 128, False)\n"
            "same = sum(t['input_ids'] == i and t['labels'] == l for t, i, l in zip(theirs, ours['input_ids'], ours['labels']))\n"
            "print('TOKENS', json.dumps({'records': len(recs), 'identical': same, 'pad_id': ours_tok.pad_token_id,"
            " 'pass': same == len(recs) and ours_tok.pad_token_id == 0}))\n")
        _, tokens = self.python_json("check/tokens", code, "TOKENS", need_s=20)
        if tokens is not None:
            self.results["checks"]["tokens_match"] = tokens

    def same_training(self, suite: str, data_args: list[str], data_kwargs: dict, flags: list[str]) -> None:
        ref = self.work / f"check-{suite}-reference"
        shutil.rmtree(ref, ignore_errors=True)
        k = str(self.a.check_steps)
        rc, _ = self.sh(f"check/{suite}/peer-reference",
                        [sys.executable, "benchmarks/peer_reference.py", "run", "--ckpt", str(self.a.ckpt),
                         "--out", str(ref), "--steps", k, "--data-json", json.dumps(data_kwargs)],
                        need_s=self.a.min_run_s)
        if rc != 0:
            self.results["checks"][suite] = {"pass": False, "error": "reference run failed"}
            return
        exact = self.work / f"check-{suite}-fp32"
        if self.a.check_fp32:  # the same 4-bit training without bf16 rounding, from the same adapter
            shutil.rmtree(exact, ignore_errors=True)
            rc, _ = self.sh(f"check/{suite}/fp32-reference",
                            [sys.executable, "benchmarks/peer_reference.py", "run", "--ckpt", str(self.a.ckpt),
                             "--out", str(exact), "--steps", k, "--data-json", json.dumps(data_kwargs),
                             "--precision", "fp32", "--init", str(ref / "init")], need_s=self.a.min_run_s)
            if rc == 0:
                self.results["fp32"][f"{suite}: peer"] = self._compare(
                    f"check/{suite}/peer-vs-fp32", exact, ["--ours-ref", str(ref)], ref / "final", "peer recipe")
            else:
                exact = None
        runs = [("ours", flags)]
        if self.a.check_control:  # the same flags eager: what the compiled path changes beyond bf16 noise
            runs.append(("eager-control", [*flags, "--model.compile", "false", "--model.compile_dequantize", "false"]))
        for label, run_flags in runs:
            key = suite if label == "ours" else f"{suite} (eager control)"
            self.results["checks"][key] = self._check_run(suite, label, ref, data_args, run_flags)
            run_dir = self.work / f"check-{suite}-{label}"
            if self.a.check_fp32 and exact and (run_dir / "adapter").exists():
                to_fp32 = self._compare(f"check/{suite}/{label}-vs-fp32", exact,
                                        ["--ours-logdir", str(run_dir / "lightning_logs" / "version_0")],
                                        run_dir / "adapter", " ".join(run_flags))
                self.results["fp32"][f"{suite}: {label}"] = to_fp32
                self.results["checks"][key] = against_fp32(self.results["checks"][key], to_fp32,
                                                           self.results["fp32"].get(f"{suite}: peer", {}))

    def _check_run(self, suite: str, label: str, ref: Path, data_args: list[str], flags: list[str]) -> dict:
        """Our fit from the reference's LoRA init on the same batches, compared with the reference."""
        k = str(self.a.check_steps)
        run_dir = self.work / f"check-{suite}-{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "lightning_qpeft", "fit", "--config", str(CONFIG),
               "--model.base_model", str(self.a.ckpt), "--trainer.default_root_dir", str(run_dir), *QUIET,
               *data_args, *flags, "--model.adapter", "null", "--model.adapter_path", str(ref / "init"),
               "--model.upcast_embeddings", "true", "--trainer.max_steps", k, "--trainer.max_epochs", "-1",
               "--trainer.log_every_n_steps", "1", "--adapter_export.dirpath", str(run_dir / "adapter"),
               "--efficiency.enabled", "false"]
        rc, _ = self.sh(f"check/{suite}/{label}", cmd, need_s=self.a.min_run_s)
        if rc != 0:
            return {"pass": False, "error": f"{label} run failed", "flags": " ".join(flags)}
        return self._compare(f"check/{suite}/{label}/compare", ref,
                             ["--ours-logdir", str(run_dir / "lightning_logs" / "version_0")], run_dir / "adapter",
                             " ".join(flags))

    def _compare(self, name: str, ref: Path, ours: list[str], adapter: Path, flags: str) -> dict:
        """peer_reference.py compare: losses and adapter updates of `ours` against the reference `ref`."""
        rc, text = self.sh(name, [sys.executable, "benchmarks/peer_reference.py", "compare", "--ref", str(ref),
                                  *ours, "--ours-adapter", str(adapter)], need_s=5)
        lines = [x for x in text.splitlines() if x.startswith("{")]
        result = json.loads(lines[-1]) if rc == 0 and lines else {"pass": False}
        result["flags"] = flags
        return result

    # --------------------------------------------------------------------------------------- report
    def table(self) -> str:
        runs = self.results["runs"]
        peers = {r["suite"]: r for r in runs if r["run"] == "peer" and r.get("tokens_per_s")}
        for r in runs:  # the peer's MFU from our FLOP count: same records, so the same FLOPs per token
            if r["run"] == "peer" and r.get("tokens_per_s"):
                ours = [o for o in runs if o["suite"] == r["suite"] and o.get("model_flops_per_token")]
                if ours and ours[0].get("peak_flops"):
                    r["mfu"] = r["tokens_per_s"] * ours[0]["model_flops_per_token"] / ours[0]["peak_flops"]

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        head = ("| suite | run | tokens/s | supervised tokens/s | records/step | peak GiB | MFU | tokens/s vs peer "
                "| peak vs peer |\n|---|---|---|---|---|---|---|---|---|")
        rows = []
        for r in runs:
            p = peers.get(r["suite"])
            ratio = r["tokens_per_s"] / p["tokens_per_s"] if p and r.get("tokens_per_s") else None
            mem = r["peak_gib"] / p["peak_gib"] if p and r.get("peak_gib") else None
            name = r["run"] if r.get("rc") == 0 else f"{r['run']} ({'skipped' if r.get('rc') == -1 else 'failed'})"
            name += " (py-spy: not a measurement)" if r.get("sampled") else ""
            rows.append(f"| {r['suite']} | {name} | {f(r.get('tokens_per_s'), ',.0f')} | "
                        f"{f(r.get('supervised_tokens_per_s'), ',.0f')} | {f(r.get('records_per_step'), '.1f')} | "
                        f"{f(r.get('peak_gib'), '.2f')} | {f(r.get('mfu'), '.3f')} | {f(ratio, '.2f')}x | "
                        f"{f(mem, '.2f')}x |")
        return head + "\n" + "\n".join(rows)

    def finish(self) -> None:
        checks = self.results["checks"]
        for name, c in checks.items():
            self.say(f"check {name}: {'PASS' if c.get('pass') else 'FAIL'} {json.dumps(c)}")
        for name, c in self.results["fp32"].items():  # information: how far bf16 moves each run from fp32
            self.say(f"against the fp32 training, {name}: max |loss diff| {c.get('max_abs_loss_diff')}, "
                     f"update cosine {c.get('adapter_update_cosine')}")
        for r in self.results["runs"]:
            if r.get("flags"):
                self.say(f"{r['suite']}/{r['run']}: {r['flags']}")
            if r.get("profile"):
                p = r["profile"]
                cats = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in list(p["categories_s_per_step"].items())[:5])
                self.say(f"{r['suite']}/{r['run']} profile: {p['wall_s_per_step'] * 1e3:.0f} ms/step, GPU idle "
                         f"{100 * (p['gpu_idle_fraction'] or 0):.0f} %; ms/step: {cats}")
        table = self.table()
        v = self.results.get("versions", {})
        head = (f"device {v.get('device', '?')}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
                f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, lightning {v.get('lightning')}, "
                f"liger-kernel {v.get('liger_kernel')}; {time.strftime('%Y-%m-%d')}; {time.time() - self.t0:.0f} s")
        verdict = "; ".join(f"{k}: {'PASS' if c.get('pass') else 'FAIL'}" for k, c in checks.items()) or "not run"
        text = f"{head}\nsame training: {verdict}\n\n{table}\n"
        self.results["table"] = text
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "table.md").write_text(text)
        self.log.close()
        print("\n" + text, flush=True)


# How much closer to the fp32 training the peer's bf16 run may be than ours (adapter-update cosines). Call K: the
# peer and our runs were each 0.9709 from it, and 0.984-0.992 from each other: bf16 alone moves three steps' update
# by ~0.03, so a fixed line on the cosine between two bf16 runs (0.99 until call K) says little.
FP32_COSINE_SLACK = 0.005


def against_fp32(check: dict, ours: dict, peer: dict) -> dict:
    """The same-training verdict when an fp32 reference ran: our losses within the tolerance of the peer's
    (`check`, compare's loss test) and our update at least as close to the fp32 training's as the peer's is, less
    FP32_COSINE_SLACK. `check` keeps its cosine to the peer, as information."""
    mine, theirs = ours.get("adapter_update_cosine"), peer.get("adapter_update_cosine")
    if mine is None or theirs is None or check.get("max_abs_loss_diff") is None:
        return {**check, "criterion": "loss diff <= tolerance, cosine to the peer's update >= 0.99 (no fp32 run)"}
    out = {**check, "cosine_to_fp32": mine, "peer_cosine_to_fp32": theirs,
           "criterion": f"loss diff <= tolerance, cosine to fp32 >= peer's - {FP32_COSINE_SLACK}"}
    out["pass"] = bool(check.get("losses_pass") and not check.get("tensors_mismatched")
                       and mine >= theirs - FP32_COSINE_SLACK)
    return out


def find_pyspy() -> Optional[str]:
    """py-spy on PATH, or the binary its wheel puts in <target>/bin when installed with --target (qlora_speed.sh)."""
    found = shutil.which("py-spy")
    for entry in sys.path if not found else []:
        candidate = Path(entry) / "bin" / "py-spy"
        if entry and candidate.is_file():
            return str(candidate)
    return found


def batching(flags: list[str]) -> dict:
    """The data settings that decide our training batches (which records, how long), from the config as `flags`
    override it."""
    import yaml

    keys = ("group_by_length", "pad_to_multiple_of", "packing", "max_tokens")
    data = yaml.safe_load(CONFIG.read_text()).get("data", {})
    out = {k: data[k] for k in keys if k in data}
    for flag, value in zip(flags, flags[1:]):
        if flag.startswith("--data.") and flag[len("--data."):] in keys:
            out[flag[len("--data."):]] = yaml.safe_load(value)
    return out


def variants(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    out = []
    for name in [v for v in a.variants.split(",") if v]:
        if name not in PRESETS:
            sys.exit(f"--variants: unknown preset {name!r}; choose from {', '.join(PRESETS)} or use --variant")
        out.append((name, PRESETS[name]))
    for spec in a.variant:
        name, _, flags = spec.partition("=")
        out.append((name, shlex.split(flags)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, table.md, runs.log ($OUT)")
    ap.add_argument("--bench-data", type=Path, default=ROOT / "bench_data",
                    help="the peer scripts, alpaca_5000.json and llama2/tokenizer.model (git-ignored)")
    ap.add_argument("--peer-dir", type=Path, help="default: --bench-data")
    ap.add_argument("--alpaca", type=Path, help="default: <bench-data>/alpaca_5000.json")
    ap.add_argument("--tokenizer", type=Path, help="default: <bench-data>/llama2")
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/ckpt-llama2-7b"),
                    help="the random-weight checkpoint (peer_fixed_length.py uses /tmp/ckpt-llama2-7b)")
    ap.add_argument("--work", default="/tmp/qpeft_bench", help="run folders")
    ap.add_argument("--suites", default="real,fixed")
    ap.add_argument("--variants", default="default,fused", help=f"comma-separated presets: {', '.join(PRESETS)}")
    ap.add_argument("--variant", action="append", default=[], help="NAME='extra CLI flags' (repeatable)")
    ap.add_argument("--small-model", type=Path, default=ROOT / "checkpoints" / "smollm2-135m-instruct",
                    help="suite small: the model folder (python -m lightning_qpeft fetch smollm2-135m-instruct)")
    ap.add_argument("--small-data", type=Path, help="suite small: SAMSum training JSONL (default: "
                    "<bench-data>/smollm2/samsum_train.jsonl, benchmarks/smollm2_data.py)")
    ap.add_argument("--small-records", type=int, default=384, help="suite small: dialogues a run trains on")
    ap.add_argument("--small-variants", default="default,bf16",
                    help=f"suite small: comma-separated presets: {', '.join(SMALL_PRESETS)}")
    ap.add_argument("--no-peer", action="store_true", help="skip the peer runs (ratios then missing)")
    ap.add_argument("--check", default="real", help="same-training check on: real, fixed, both or none")
    ap.add_argument("--check-steps", type=int, default=3)
    ap.add_argument("--check-control", action="store_true", help="also check the first variant's flags with "
                    "model.compile false against the same reference (bf16 noise floor of the comparison)")
    ap.add_argument("--check-fp32", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the reference in fp32 from the same adapter and compare the bf16 peer and each "
                    "checked run with it: the verdict then asks ours to be as close to it as the peer is")
    ap.add_argument("--records", type=int, default=256, help="Alpaca records in the real suite's sample")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the sample a real-suite run trains; the "
                    "first is the warm-up (compilation), the others are measured")
    ap.add_argument("--fixed-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps of each of our runs")
    ap.add_argument("--pyspy", nargs="?", const="all", help="sample the Python stacks of these runs with py-spy "
                    "(where the CPU time goes: pyspy.txt): `all` (bare --pyspy: our runs and the peer's real run) or "
                    "variant names and/or `peer`, comma-separated. A sampled run's speed is not a measurement")
    ap.add_argument("--budget-s", type=float, default=540, help="skip runs that would end after this")
    ap.add_argument("--min-run-s", type=float, default=50, help="budget a run needs to be started")
    a = ap.parse_args()
    a.peer_dir = a.peer_dir or a.bench_data
    a.alpaca = a.alpaca or a.bench_data / "alpaca_5000.json"
    a.tokenizer = a.tokenizer or a.bench_data / "llama2"
    a.small_data = a.small_data or a.bench_data / "smollm2" / "samsum_train.jsonl"
    chosen = variants(a)
    if a.profile and a.records // 16 < a.profile + 2:
        sys.exit(f"--profile {a.profile}: needs --records >= {16 * (a.profile + 2)} (profiled steps end epoch 1)")
    if a.epochs < 2:
        sys.exit("--epochs: at least 2 (the first is not measured)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    suites = [s for s in a.suites.split(",") if s]
    unknown = sorted(set(suites) - {"real", "fixed", "small"})
    if unknown:
        sys.exit(f"--suites: unknown suite(s) {', '.join(unknown)}; choose from real, fixed, small")
    small = [v for v in a.small_variants.split(",") if v]
    if "small" in suites and set(small) - set(SMALL_PRESETS):
        sys.exit(f"--small-variants: unknown preset(s) {', '.join(sorted(set(small) - set(SMALL_PRESETS)))}; "
                 f"choose from {', '.join(SMALL_PRESETS)}")
    b = Bench(a)
    needs_7b = bool({"real", "fixed"} & set(suites)) or a.check in ("real", "fixed", "both")
    if not b.environment() or (needs_7b and not b.checkpoint()):
        b.finish()
        sys.exit(1)
    if "small" in suites:  # first: it needs neither the 7B checkpoint's time nor its memory
        data = b.small_sample()
        epoch = len(json.loads(data.read_text())) // 16
        if not a.no_peer:
            b.peer_small(data, epoch, a.epochs)
        small_args = ["--data.task", "alpaca", "--data.path", str(data), "--data.val_path", str(data),
                      "--data.source_max_len", "384", "--data.target_max_len", "128",
                      "--generation_metrics.test", "false"]
        warm = (["--efficiency.warmup_steps", str(epoch - a.profile), "--efficiency.profile_steps", str(a.profile)]
                if a.profile else ["--efficiency.warmup_steps", "0", "--efficiency.warmup_epochs", "1"])
        for name in small:
            b.ours("small", name, SMALL_PRESETS[name], small_args,
                   ["--trainer.max_epochs", str(a.epochs), "--trainer.max_steps", "-1", "--efficiency.window",
                    str(epoch), *warm], config=SMALL_CONFIG, ckpt=a.small_model)
    checks = {"both": ["real", "fixed"], "none": []}.get(a.check, [a.check])
    first_flags = chosen[0][1] if chosen else []
    if "real" in suites or "real" in checks:
        data = b.sample()
        epoch = len(json.loads(data.read_text())) // 16
        real_args = ["--data.path", str(data), "--data.val_path", str(data)]
        if "real" in checks:
            b.tokens_match(data)
        if "real" in suites:
            if not a.no_peer:
                b.peer_real(data, epoch, a.epochs)
            # the first epoch warms up (profiled steps, if any, end it), the others are measured whole
            warm = (["--efficiency.warmup_steps", str(epoch - a.profile), "--efficiency.profile_steps", str(a.profile)]
                    if a.profile else ["--efficiency.warmup_steps", "0", "--efficiency.warmup_epochs", "1"])
            for name, flags in chosen:
                b.ours("real", name, flags, real_args, ["--trainer.max_epochs", str(a.epochs), "--trainer.max_steps",
                                                        "-1", "--efficiency.window", str(epoch), *warm])
        if "real" in checks:
            kwargs = dict(tokenizer=str(a.ckpt), task="file", path=str(data), val_path=str(data), template="alpaca",
                          source_max_len=384, target_max_len=128, batch_size=16,
                          **batching(first_flags))  # the reference trains on the batches our check run sees
            b.same_training("real", real_args, kwargs, first_flags)
    fixed_args = ["--data.task", "random-tokens", "--data.path", "null", "--data.train_on_source", "true",
                  "--data.source_max_len", "384", "--data.target_max_len", "128", "--data.batch_size", "8"]
    if "fixed" in suites:
        if not a.no_peer:
            b.peer_fixed()
        for name, flags in chosen:
            b.ours("fixed", name, flags, fixed_args,
                   ["--trainer.max_steps", str(3 + a.profile + a.fixed_steps), "--efficiency.warmup_steps", "3",
                    "--efficiency.profile_steps", str(a.profile), "--efficiency.window", str(a.fixed_steps)])
    if "fixed" in checks:
        kwargs = dict(tokenizer=str(a.ckpt), task="random-tokens", train_on_source=True, source_max_len=384,
                      target_max_len=128, batch_size=8)
        b.same_training("fixed", fixed_args, kwargs, first_flags)
    b.finish()


if __name__ == "__main__":
    main()
