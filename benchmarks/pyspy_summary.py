"""Where the CPU time of a training step goes, from a py-spy recording (`py-spy record --idle --format raw`).

The torch profiler (`efficiency.profile_steps`) says how long the GPU waits for the CPU, not what the CPU does
meanwhile: kernels are its only view. py-spy samples the Python stacks of the process from outside, with no
change to the code, so it shows which Python code holds the step (our module, peft's LoRA
layers, bitsandbytes' wrappers, Lightning's loop, the optimizer, waiting in a CUDA synchronisation).

Usage (on the device, py-spy from its wheel in .whl/):

    py-spy record --idle --rate 200 --format raw -o raw.txt -- python -m lightning_qpeft fit ...
    python benchmarks/pyspy_summary.py raw.txt[.gz] [--root training_epoch_loop.py] [--top 40]

A sampled run is slowed by the sampling (by how much was not measured apart): read shares from it, not speed.
Prints the share of the training loop's samples in each phase (forward, backward, optimizer, data, callbacks,
logging) and the functions with the largest inclusive and self shares.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

def _fn(names: str, where: str = "") -> re.Pattern:
    """A frame of one of these functions (py-spy names a frame "Qualified.name (path/file.py:line)")."""
    return re.compile(rf"(^|\.)({names}) \({where}")


# A sample's phase: the first of these (innermost work first: the forward and backward run inside the optimizer's
# closure in Lightning, and the backward inside HF Trainer's training_step) matching a frame under the root.
PHASES = [
    ("backward", _fn("backward|_engine_run_backward|run_backward")),
    ("forward (training_step)", _fn("training_step|_step|compute_loss")),
    ("gradient clipping", _fn("clip_grad_norm_|clip_gradients|_clip_gradients|get_total_norm")),
    ("zero_grad", _fn("zero_grad")),
    ("data (next batch, transfer)", _fn("__next__|_next_data|fetch|batch_to_device|_apply_batch_transfer_handler|"
                                        "move_data_to_device|_prepare_inputs|get_batch_samples")),
    ("optimizer step", _fn("step|update_step|_single_tensor_adamw?|_multi_tensor_adamw?|_fused_adamw?",
                           "(bitsandbytes/optim|torch/optim)")),
    ("callbacks", _fn("_call_callback_hooks|call_event")),
    ("logging", _fn("log|log_dict|_log_metrics|log_metrics|update_train_step_metrics|_maybe_log_save_evaluate")),
]
# Samples of other threads: on CUDA the autograd engine runs backward functions (bitsandbytes' MatMul4Bit.backward,
# checkpoint recomputation) on its own device thread while the main thread waits in _engine_run_backward; those
# count. Threads parked in these leaves (data-loader pin-memory, TensorBoard writer, ...) are idle and do not.
IDLE_LEAF = re.compile(r"(^|\.)(wait|_wait_for_tstate_lock|select|poll|_poll|recv|_recv|_recv_bytes|get|sleep|"
                       r"accept|read|readinto|_worker_loop|run) \(")
# Compilation inside the loop (torch.compile's first calls and recompiles, inductor's lazy backward compile,
# Triton's JIT): a one-off cost the measured window leaves out, so its samples are counted apart, not in the shares.
# By function, not by file: the compiled forward runs at every step inside a closure defined in aot_autograd.py.
COMPILING = re.compile(r"(^|\.)(_compile|compile_inner) \((\S*/)?torch/_dynamo/|"
                       r"(^|\.)(compile_fx|compile_fx_inner|fx_codegen_and_compile|autotune_select_algorithm) "
                       r"\((\S*/)?torch/_inductor/|"
                       r"(^|\.)(create_aot_dispatcher_function|aot_module_simplified) \((\S*/)?torch/_functorch/|"
                       r"\((\S*/)?triton/compiler/compiler\.py:")
MAIN_THREAD = re.compile(r"^(_run_module_as_main|<module>) \(")
ROOTS = ["training_epoch_loop.py", "_inner_training_loop"]  # Lightning's loop, HF Trainer's loop


def _open(path: str):
    """The recording as text, gzipped (`.gz`, as qlora_speed.py keeps it) or not."""
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace")


def parse(path: str):
    for line in _open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f.strip()]  # a thread with no Python frames: nothing to say
        if frames and count.isdigit():
            yield frames, int(count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw")
    ap.add_argument("--root", help=f"only samples with a frame containing this (default: the first of {ROOTS} "
                    "found)")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    if a.root is None:
        with _open(a.raw) as f:
            text = f.read()
        a.root = next((r for r in ROOTS if r in text), ROOTS[0])

    total = compiling = 0
    worker: collections.Counter = collections.Counter()
    worker_total = 0
    phases: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    for frames, n in parse(a.raw):
        if any(COMPILING.search(f) for f in frames):
            compiling += n
            continue
        idx = next((i for i, f in enumerate(frames) if a.root in f), None)
        if idx is None:
            if any("torch/_inductor/compile_worker/" in f for f in frames):
                continue  # threads that wait for inductor's compile workers (call J: 4x the loop's samples)
            if frames and not MAIN_THREAD.search(frames[0]) and not IDLE_LEAF.search(frames[-1]):
                worker_total += n
                for f in dict.fromkeys(re.sub(r":\d+\)$", ")", f) for f in frames):
                    worker[f] += n
            continue
        below = frames[idx + 1:]
        total += n
        phase = "other loop code"
        for name, pat in PHASES:
            if any(pat.search(f) for f in below):
                phase = name
                break
        phases[phase] += n
        for f in dict.fromkeys(re.sub(r":\d+\)$", ")", f) for f in below):  # once per sample, any line; in order
            inclusive[f] += n
        if below:
            leaf[below[-1]] += n
    if not total:
        raise SystemExit(f"no samples under a frame matching {a.root!r}")
    print(f"{total} samples in the training loop ({compiling} more compiling, left out of every share below)")
    print("\nphase                               share")
    for name, n in phases.most_common():
        print(f"{name:34s} {100 * n / total:6.1f} %")
    print(f"\ntop {a.top} functions, inclusive (a function's share of the loop's samples, callees included)")
    for f, n in inclusive.most_common(a.top):
        print(f"{100 * n / total:6.1f} %  {f[:150]}")
    print(f"\ntop {a.top} leaves (self time)")
    for f, n in leaf.most_common(a.top):
        print(f"{100 * n / total:6.1f} %  {f[:150]}")
    if worker_total:
        print(f"\nother threads, busy: {worker_total} samples ({100 * worker_total / total:.1f} % of the loop's; on "
              "CUDA the autograd device thread runs backward functions and checkpoint recomputation)")
        for f, n in worker.most_common(a.top):
            print(f"{100 * n / total:6.1f} %  {f[:150]}")


if __name__ == "__main__":
    main()
