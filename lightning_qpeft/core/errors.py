"""`ConfigError`: a configuration the project refuses before it runs.

Its text names the config key, the reason and the way out; callers that need to tell a refusal from a failure
(the study's cells) look at the exception's type, never at its words.
"""

from __future__ import annotations

from typing import Optional


class ConfigError(ValueError):
    """A refused configuration: `key` is the setting to change, `reason` why it cannot run, `way_out` what to do.

    The text is `"<head>: <reason>; <way_out>"`, where `head` defaults to the key; a rule that involves two keys
    gives a head naming both (`model.adapter=x cannot run with model.quantization=y`). A subclass of ValueError,
    so code that catches bad values catches refusals too.

    Args:
        key: the config key the refusal is about (`model.adapter`, `trainer.strategy`, ...).
        reason: why the configuration cannot run.
        way_out: what to set instead (empty: the reason says it).
        head: the text before the colon, when it says more than the key.
    """

    def __init__(self, key: str, reason: str, way_out: str = "", head: Optional[str] = None) -> None:
        self.key, self.reason, self.way_out, self.head = key, reason, way_out, head
        super().__init__(f"{head or key}: {reason}" + (f"; {way_out}" if way_out else ""))

    def __reduce__(self):  # pickles (multiprocessing, spawn) with its fields, not only its text
        return type(self), (self.key, self.reason, self.way_out, self.head)
