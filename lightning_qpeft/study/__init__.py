"""Studies: one command runs a grid of quantization x adapter x task (x anything) and writes the comparison.

    python -m lightning_qpeft study --config configs/study/tiny.yaml

config.py (the spec and its grid), runner.py (a process per cell, resumable), cell.py (what runs in it),
collect.py (a cell's numbers from its TensorBoard logs), report.py / plots.py / hparams.py (the outputs).
"""
