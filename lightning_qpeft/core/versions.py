"""The versions a run ran with, recorded in its outputs (`perf.json`, `qpeft_training.json`, study results) so
that a figure can be traced to its environment (docs/constraints.md)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "lightning", "datasets", "accelerate", "tokenizers")


def library_versions() -> dict[str, str]:
    """Python and the main libraries' versions ("absent" for one not installed); CUDA's where torch has it."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    try:
        import torch

        found["cuda"] = torch.version.cuda or "none"
    except ImportError:
        pass
    return found
