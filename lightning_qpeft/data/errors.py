"""`DataError`: bad input data. Its own module so that readers which need no `datasets` (the MMLU loaders, run
by GPU benchmarks on a bare torch + transformers install) can raise it without importing `sources.py`."""


class DataError(ValueError):
    """Bad input data; the message names the file and the line or record."""
