"""`DataError`: bad input data, raised by every reader (the data module's and the MMLU loaders').

In core so that data/ and evaluation/ raise the one class without importing each other, and so that readers
which need no `datasets` (the MMLU loaders, run by GPU benchmarks on a bare torch + transformers install) can
raise it without importing `data/sources.py`.
"""


from lightning_qpeft.core.errors import ConfigError


class DataError(ConfigError):
    """Bad input data; the message names the file and the line or record.

    A refusal like any `ConfigError` (the study counts a cell it ends as refused): the data the configuration
    names cannot be used. Its text is the message as given; `key` is the config key it opens with, when it does.
    """

    def __init__(self, message: str) -> None:
        key, sep, reason = message.partition(": ")
        super().__init__(key if sep else "", reason if sep else message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), self.args
