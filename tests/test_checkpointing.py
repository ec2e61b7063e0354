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
