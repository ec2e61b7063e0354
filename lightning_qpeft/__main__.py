"""python -m lightning_qpeft COMMAND ...

fit, validate, test and predict are LightningCLI's (cli.py). The other commands are small jsonargparse
programs of their own, named here and imported only when asked for (LitGPT's `__main__` pattern).
"""

import importlib
import sys

# command -> "module:function"; each function parses its own arguments
COMMANDS: dict[str, str] = {
    "merge": "lightning_qpeft.merge:main",  # adapter + dequantized base -> plain model folder
    "study": "lightning_qpeft.study.cli:main",  # a grid of runs, one process a cell, and its report
    "fetch": "lightning_qpeft.fetch:main",  # a model or dataset the project knows, checked and converted
}


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in COMMANDS:
        module, function = COMMANDS[command].split(":")
        getattr(importlib.import_module(module), function)(sys.argv[2:])
        return
    from lightning_qpeft.cli import main as lightning_main

    lightning_main()


if __name__ == "__main__":
    main()
