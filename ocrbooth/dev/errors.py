"""The development stack's one error, raised by its parts (processes, topics, the stack, `ocrbooth dev`)."""

from __future__ import annotations


class EmbeddedStackError(RuntimeError):
    """The embedded stack could not start (missing binary, busy port, child exited, not ready in time)."""
