"""Adapter-only FSDP checkpoints: the trainable tensors gathered unit by unit equal the unwrapped model's.

torch's FSDP on the CPU (gloo; Lightning refuses FSDP on a CPU, so the strategy's function is called on a model
wrapped as the strategy wraps it): two ranks (FULL_SHARD: every unit sharded) and one (FSDP runs NO_SHARD,
where FSDP's own CPU offload raised on a GPU: "offload_to_cpu=True and NO_SHARD is not supported yet"); gathered
before the first forward (a save at step 0, which must not break the forward after it) and after a step.
"""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.distributed_helpers import gather_trainable_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [1, 2])
# LoRA's leaves are units inside the decoder layers' units; the prompt embedding is one under the root
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_gathered_trainable_tensors_equal_the_unwrapped_ones(tiny_model_dir, tmp_path, world, method):
    out = tmp_path / "gathered.safetensors"
    mp.spawn(gather_trainable_worker, args=(world, tiny_model_dir, method, free_port(), str(out)), nprocs=world)
    tensors = load_file(str(out))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    before, gathered, trained, whole = part("before/"), part("gathered/"), part("trained/"), part("whole/")
    assert len(before) > 0 and gathered.keys() == before.keys() == trained.keys() == whole.keys()
    for name, value in before.items():
        torch.testing.assert_close(gathered[name], value, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(trained[name], whole[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(trained[n], before[n]) for n in before)  # the step changed them


def test_fsdp_optimizer_state_resumes_when_the_optimizer_holds_only_the_adapter(tiny_model_dir, tmp_path):
    # Lightning re-keys the saved state by position in model.parameters() and back by position at resume; under
    # use_orig_params that order changes once the model has run a step, so the resumed ids name the wrong tensors
    # (on one H200: KeyError 'model.base_model.model.model.embed_tokens.weight' at resume). The strategy keeps
    # the names. If Lightning fixes its path, the last assertion fails: the override can then go.
    import json

    from tests.distributed_helpers import optimizer_resume_worker

    out = tmp_path / "states.json"
    mp.spawn(optimizer_resume_worker, args=(tiny_model_dir, free_port(), str(out)), nprocs=1)
    result = json.loads(out.read_text())
    assert len(result["trained"]) > 0 and result["QPeftFSDPStrategy"] == result["trained"]
    assert result["FSDPStrategy"].startswith("KeyError")  # what the strategy fixes
