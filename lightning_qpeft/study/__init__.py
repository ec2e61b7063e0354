"""Studies: one command runs a grid of quantization x adapter x task (x anything) and writes the comparison.

    python -m lightning_qpeft study --config configs/study/tiny.yaml

config.py (the spec and its grid), runner.py (a process per cell, resumable), cell.py (what runs in it),
collect.py (a cell's numbers from its TensorBoard logs), results.py (the grid and its cells' results: what the
runner returns), report.py / plots.py (the outputs, functions of the results), hparams.py (TensorBoard's view).
Imports point one way: cli -> runner -> results -> config, and report -> plots -> results; the runner is handed
its report as a function (study/cli.py), so it never imports one.
"""
