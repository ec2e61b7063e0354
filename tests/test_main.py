"""The front door: `lightning-qpeft --help` (and `python -m lightning_qpeft --help`) lists every command."""

import configparser
import subprocess
import sys
from pathlib import Path

from lightning_qpeft.__main__ import COMMANDS, LIGHTNING_COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_with_a_line_each():
    out = subprocess.run([sys.executable, "-m", "lightning_qpeft", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == [*LIGHTNING_COMMANDS, *COMMANDS]
    assert {"fit", "validate", "test", "predict", "merge", "study", "fetch"} <= set(listed)


def test_console_script_points_at_the_same_entry():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    assert "lightning-qpeft = lightning_qpeft.__main__:main" in [s.strip() for s in scripts]
