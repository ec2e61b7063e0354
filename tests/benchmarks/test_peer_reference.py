"""benchmarks/peer_reference.py on the CPU (fp32 there): a second run from the first's saved adapter trains the
very same steps, so `compare` finds equal losses and a cosine of 1; an adapter that moved differently does not."""

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "peer_reference.py")


def call(*args):
    p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def test_a_run_from_another_runs_init_trains_the_same_steps(tiny_model_dir, tmp_path):
    data = json.dumps({"tokenizer": str(tiny_model_dir), "batch_size": 4, "max_train_records": 16,
                       "source_max_len": 48, "target_max_len": 32})
    first, second = tmp_path / "first", tmp_path / "second"
    call("run", "--ckpt", tiny_model_dir, "--out", first, "--steps", 2, "--data-json", data, "--device", "cpu")
    call("run", "--ckpt", tiny_model_dir, "--out", second, "--steps", 2, "--data-json", data, "--device", "cpu",
         "--precision", "fp32", "--init", first / "init")
    a, b = (load_file(str(d / "init" / "adapter_model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    same = call("compare", "--ref", second, "--ours-ref", first, "--ours-adapter", first / "final")
    assert same["pass"] and same["max_abs_loss_diff"] < 1e-5 and same["adapter_update_cosine"] > 0.999999
    assert same["tensors_compared"] == len(a)

    # the trained adapter with its update reversed: the same losses on record, but the cosine is -1
    init, final = a, load_file(str(first / "final" / "adapter_model.safetensors"))
    reverse = tmp_path / "reverse"
    reverse.mkdir()
    save_file({k: 2 * init[k] - final[k] for k in final}, str(reverse / "adapter_model.safetensors"))
    moved = call("compare", "--ref", second, "--ours-ref", first, "--ours-adapter", reverse)
    assert not moved["pass"] and moved["adapter_update_cosine"] < -0.999
