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


def human_bytes(n: float | None) -> str:
    """``512 B``, ``1.5 KiB`` ... ``2.0 TiB``: a byte count as a person reads it; ``n/a`` for None."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
