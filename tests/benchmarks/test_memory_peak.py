"""benchmarks/memory_peak.py on a hand-made allocation trace (the format of torch.cuda.memory._snapshot())."""

import pickle
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import memory_peak  # noqa: E402

GIB = 2**30


def frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


LOAD = [frame("/x/torch/nn/modules/module.py", 1, "_apply"),
        frame("/x/site-packages/bitsandbytes/nn/modules.py", 300, "_quantize"),
        frame("/x/site-packages/lightning_qpeft/model/random_init.py", 90, "build_random_model")]
WRAP = [frame("/x/site-packages/torch/distributed/fsdp/_flat_param.py", 700, "flatten_tensors"),
        frame("/x/site-packages/lightning/pytorch/strategies/fsdp.py", 310, "_setup_model")]


FREE = [frame("/x/site-packages/torch/distributed/fsdp/_flat_param.py", 1500, "_use_sharded_views")]


def trace():
    # 2 GiB loaded (two blocks), 1 GiB of wrapping copies, one loaded block freed, then a later 0.5 GiB: the
    # peak is 3 GiB, at the third alloc, with both loaded blocks and the copy live; after it, the first loaded
    # block is freed from no named frame, the second by FSDP, the copy never
    return [
        {"action": "alloc", "addr": 1, "size": GIB, "frames": LOAD},
        {"action": "alloc", "addr": 2, "size": GIB, "frames": LOAD},
        {"action": "segment_alloc", "addr": 0, "size": 4 * GIB, "frames": []},
        {"action": "alloc", "addr": 3, "size": GIB, "frames": WRAP},
        {"action": "free_requested", "addr": 1, "size": GIB, "frames": []},
        {"action": "free_completed", "addr": 1, "size": GIB, "frames": []},
        {"action": "alloc", "addr": 4, "size": GIB // 2, "frames": WRAP},
        {"action": "free_requested", "addr": 2, "size": GIB, "frames": FREE},
        {"action": "free_completed", "addr": 2, "size": GIB, "frames": FREE},
    ]


def test_replay_finds_the_peak_and_what_was_live_then():
    peak, at, live = memory_peak.replay(trace())
    assert (peak, at, sorted(live)) == (3 * GIB, 3, [1, 2, 3])


def test_report_groups_the_live_blocks_by_site(tmp_path):
    text = memory_peak.report({"device_traces": [trace()]})
    lines = text.splitlines()
    assert lines[0] == ("9 events; peak 3.00 GiB allocated at event 3; live then, by site (and where they were "
                        "freed later):")
    loaded = ["1.00", "GiB", "1", "blocks", "bitsandbytes/nn/modules.py:300", "_quantize", "<",
              "lightning_qpeft/model/random_init.py:90", "build_random_model"]
    # three groups of 1 GiB, in the order of their allocation (sizes tie)
    assert lines[1].split() == loaded and lines[2].split()[:3] == ["freed:", "(no", "frame"]
    assert lines[3].split() == loaded
    assert lines[4].split() == ["freed:", "torch/distributed/fsdp/_flat_param.py:1500", "_use_sharded_views"]
    assert lines[5].split()[:4] == ["1.00", "GiB", "1", "blocks"] and "_flat_param.py:700" in lines[5]
    assert lines[6].split() == ["freed:", "not", "freed", "before", "the", "trace", "ends"]
    assert memory_peak.report({"device_traces": []}).startswith("no allocation trace for device 0")
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps({"device_traces": [trace()]}))
    out = subprocess.run([sys.executable, str(Path(memory_peak.__file__)), str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[1] == lines[0]
