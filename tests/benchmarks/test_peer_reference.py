"""benchmarks/peer_reference.py on the CPU (fp32 there): a second run from the first's saved adapter trains the
very same steps, so `compare` finds equal losses and a cosine of 1; an adapter that moved differently does not."""

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import peer_reference  # noqa: E402


def call(capsys, command, **kw):
    """One subcommand in this process (its imports are already paid); returns the JSON it prints last."""
    capsys.readouterr()
    args = {"run": dict(steps=2, device="cpu", precision="bf16", init=None),
            "compare": dict(ours_logdir=None, ours_ref=None, loss_tol=0.02, cosine_min=0.99)}[command]
    getattr(peer_reference, command)(argparse.Namespace(**{**args, **kw}))
    return json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])


def test_a_run_from_another_runs_init_trains_the_same_steps(tiny_model_dir, tmp_path, capsys):
    data = json.dumps({"tokenizer": str(tiny_model_dir), "batch_size": 4, "max_train_records": 16,
                       "source_max_len": 48, "target_max_len": 32})
    first, second = tmp_path / "first", tmp_path / "second"
    call(capsys, "run", ckpt=tiny_model_dir, out=first, data_json=data)
    call(capsys, "run", ckpt=tiny_model_dir, out=second, data_json=data, precision="fp32", init=first / "init")
    a, b = (load_file(str(d / "init" / "adapter_model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    same = call(capsys, "compare", ref=second, ours_ref=first, ours_adapter=first / "final")
    assert same["pass"] and same["max_abs_loss_diff"] < 1e-5 and same["adapter_update_cosine"] > 0.999999
    assert same["tensors_compared"] == len(a)

    # the trained adapter with its update reversed: the same losses on record, but the cosine is -1
    init, final = a, load_file(str(first / "final" / "adapter_model.safetensors"))
    reverse = tmp_path / "reverse"
    reverse.mkdir()
    save_file({k: 2 * init[k] - final[k] for k in final}, str(reverse / "adapter_model.safetensors"))
    moved = call(capsys, "compare", ref=second, ours_ref=first, ours_adapter=reverse)
    assert not moved["pass"] and moved["adapter_update_cosine"] < -0.999
