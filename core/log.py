"""The log line every stage writes: one message per call, on stderr, so stdout stays free for ``--json``."""

from __future__ import annotations

import sys
from collections.abc import Callable

Log = Callable[[str], None]
"""What a stage recipe logs through: called with one line (no trailing newline)."""


def log_stderr(message: str) -> None:
    """The default log of the stage recipes: one line on stderr, flushed."""
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """A log that drops every line (the ranks of a DDP job other than rank 0)."""
