"""Checkpoint files: atomic writes (a failure mid-write leaves the previous file), no code run on load."""

import os
import pickle

import pytest
import torch

from lightning_qpeft.checkpointing import AtomicCheckpointIO

MARKER = "/tmp/lightning_qpeft_pwned"


class RunsCode:
    """Pickles to a call of os.system: loading it with plain pickle would run the command."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_crafted_checkpoint_does_not_run_code(tmp_path):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode()}, path)
    with pytest.raises(ValueError, match="refused: loading it could run code"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not os.path.exists(MARKER)
    with pytest.raises(pickle.UnpicklingError):  # and the file really is hostile: sanity of the test itself
        torch.load(path, weights_only=True)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_not_a_checkpoint_is_refused_clearly(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="ckpt_path: no checkpoint at"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_disk_full_during_an_adapter_export_keeps_the_previous_export(tiny_model_dir, tmp_path, monkeypatch):
    import peft
    from safetensors.torch import load_file

    from lightning_qpeft.callbacks.adapter_export import export_model
    from lightning_qpeft.model.loading import load_base_model

    model = peft.get_peft_model(load_base_model(tiny_model_dir, "none", dtype="float32"),
                                peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    export_model(model, tmp_path / "adapter", {"step": 1})
    first = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def disk_full(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, tmp_path / "adapter", {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind
    kept = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in kept)
    assert '"step": 1' in (tmp_path / "adapter" / "qpeft_training.json").read_text()
    # and the export that did not fail replaces it
    export_model(model, tmp_path / "adapter", {"step": 3})
    assert not torch.equal(load_file(tmp_path / "adapter" / "adapter_model.safetensors")[next(iter(first))],
                           first[next(iter(first))])
