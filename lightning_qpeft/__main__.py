"""`lightning-qpeft COMMAND ...` (or `python -m lightning_qpeft COMMAND ...`).

fit, validate, test and predict are LightningCLI's (cli.py). The other commands are small jsonargparse
programs of their own, named here and imported only when asked for (LitGPT's `__main__` pattern).
"""

from __future__ import annotations

import importlib
import sys

# command -> ("module:function", one line of help); each function parses its own arguments
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("lightning_qpeft.merge:main", "fold a trained adapter into its dequantized base: a plain model folder"),
    "study": ("lightning_qpeft.study.cli:main", "a grid of runs (quantization x adapter x task ...), one process a "
              "cell, and its report"),
    "fetch": ("lightning_qpeft.fetch:main", "a model or dataset the project knows (SmolLM2, MMLU), checked and "
              "converted"),
    "chat": ("lightning_qpeft.chat:main", "talk to a base model or a trained adapter in the terminal (or answer "
             "one --prompt)"),
}
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train (and validate) a model with an adapter; exports the adapter at the end",
    "validate": "validation loss, generation metrics and MMLU of a base model or a trained adapter",
    "test": "test loss and generation metrics (ROUGE, BLEU, stopped fraction) on the test split",
    "predict": "generate for every record of data.predict_path into JSON lines",
}


def usage() -> str:
    rows = {**LIGHTNING_COMMANDS, **{name: text for name, (_, text) in COMMANDS.items()}}
    width = max(len(name) for name in rows)
    lines = ["usage: lightning-qpeft COMMAND [--config FILE] [--key value ...]   (or python -m lightning_qpeft)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in rows.items()]
    lines += ["", "lightning-qpeft COMMAND --help lists a command's keys; README.md is the user's guide."]
    return "\n".join(lines)


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help"):
        print(usage())
        return
    if command in COMMANDS:
        module, function = COMMANDS[command][0].split(":")
        getattr(importlib.import_module(module), function)(sys.argv[2:])
        return
    from lightning_qpeft.cli import main as lightning_main

    lightning_main()


if __name__ == "__main__":
    main()
