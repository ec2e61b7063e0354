"""The bottom layer: what every other package shares (token constants and conventions, tensor checks, errors).

Imports nothing from the rest of `lightning_qpeft` (tests/test_layers.py checks it).
"""
