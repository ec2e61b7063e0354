"""benchmarks/pyspy_summary.py: a py-spy raw recording -> phase shares of the training loop, computed by hand here."""

import gzip
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOP = ("_run_module_as_main (<frozen runpy>:198);main (lightning_qpeft/__main__.py:23);"
        "_TrainingEpochLoop.advance (lightning/pytorch/loops/training_epoch_loop.py:352);"
        "Adam.step (torch/optim/adam.py:200)")
CLOSURE = LOOP + ";Closure.__call__ (lightning/pytorch/loops/optimization/automatic.py:150)"


def test_shares_phases_and_the_autograd_thread(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        # 30 samples forward, 50 backward (main thread waiting), 20 in the optimizer's own update
        CLOSURE + ";QPeftModule.training_step (lightning_qpeft/model/module.py:331);"
                  "Linear4bit.forward (peft/tuners/lora/bnb.py:533) 20",
        # a compiled layer running at step time: the closure aot_autograd.py returns is not compilation
        CLOSURE + ";QPeftModule.training_step (lightning_qpeft/model/module.py:331);"
                  "forward (/opt/venv/lib/python3.12/site-packages/torch/_functorch/aot_autograd.py:1277) 8",
        # nor is a regular expression compiled at step time
        CLOSURE + ";QPeftModule.training_step (lightning_qpeft/model/module.py:331);_compile (re/__init__.py:280) 2",
        CLOSURE + ";Tensor.backward (torch/_tensor.py:600);_engine_run_backward (torch/autograd/graph.py:869) 50",
        LOOP + ";_single_tensor_adam (torch/optim/adam.py:475) 20",
        # the autograd device thread recomputing a checkpointed layer: 25 busy samples; an idle writer thread: 40
        "unpack_hook (torch/utils/checkpoint.py:1100);LlamaDecoderLayer.forward (transformers/models/llama/"
        "modeling_llama.py:300) 25",
        "Thread._bootstrap (threading.py:1000);Condition.wait (threading.py:320) 40",
        "Thread.run (threading.py:1000);_recv_msg (torch/_inductor/compile_worker/subproc_pool.py:80) 70",
        # torch.compile's first call inside the forward, and inductor compiling the backward: left out (60)
        CLOSURE + ";QPeftModule.training_step (lightning_qpeft/model/module.py:331);"
                  "_compile (/opt/venv/lib/python3.12/site-packages/torch/_dynamo/convert_frame.py:1100) 45",
        CLOSURE + ";Tensor.backward (torch/_tensor.py:600);CompiledFunction.backward (torch/_functorch/_aot_autograd/"
                  "runtime_wrappers.py:2200);compile_fx_inner (torch/_inductor/compile_fx.py:700) 15",
        # before the loop (imports): not counted
        "_run_module_as_main (<frozen runpy>:198);<module> (lightning_qpeft/cli.py:24) 999",
        "",
    ]))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pyspy_summary.py"), str(raw), "--top", "5"],
                         capture_output=True, text=True, check=True).stdout
    assert "100 samples in the training loop (60 more compiling, left out" in out
    shares = {line[:34].strip(): float(line[34:].split("%")[0]) for line in out.splitlines()
              if line.endswith("%") and not line.startswith(" ")}
    assert shares == {"backward": 50.0, "forward (training_step)": 30.0, "optimizer step": 20.0}
    assert "other threads, busy: 25 samples (25.0 % of the loop's" in out
    assert "25.0 %  LlamaDecoderLayer.forward (transformers/models/llama/modeling_llama.py)" in out
    assert "Condition.wait" not in out and "_recv_msg" not in out  # an idle thread is not CPU time

    # gzipped, as qlora_speed.py keeps the recording: the same summary
    zipped = tmp_path / "raw.txt.gz"
    zipped.write_bytes(gzip.compress(raw.read_bytes()))
    assert subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pyspy_summary.py"), str(zipped), "--top", "5"],
                          capture_output=True, text=True, check=True).stdout == out
