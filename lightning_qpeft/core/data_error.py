"""`DataError`: bad input data, raised by every reader (the data module's and the MMLU loaders').

In core so that data/ and evaluation/ raise the one class without importing each other, and so that readers
which need no `datasets` (the MMLU loaders, run by GPU benchmarks on a bare torch + transformers install) can
raise it without importing `data/sources.py`.
"""


class DataError(ValueError):
    """Bad input data; the message names the file and the line or record."""
