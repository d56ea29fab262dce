"""A test-only handler that kills its own process on a planted message, standing in for a native crash in a
parser, an OOM kill or any bug that takes the whole daemon down. Loaded by the daemon subprocess with
`OCRBOOTH_HANDLERS=tests.chaos.killer:KillerHandler`; otherwise it answers like `echo`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ocrbooth.handlers.base import MessageContext, OutputEvent
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.schemas import DocumentRequest

MARKER = "chaos.kill"
"""Metadata key: a request whose metadata has it set to "1" kills the process."""
LOG_ENV = "CHAOS_KILLER_LOG"
"""File the handler appends a line to before each kill, so the test can count how often it ran."""


class KillerHandler(EchoHandler):
    """`echo`, except that a request marked `chaos.kill: "1"` ends the process with os._exit(1)."""

    name = "killer"

    async def handle(self, event: DocumentRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        """Die on the marker, echo otherwise."""
        if event.metadata.get(MARKER) == "1":
            _note(ctx.source)
            os._exit(1)  # no cleanup, no commit, no drain: as abrupt as a segfault
        return await super().handle(event, ctx)


def _note(source: str) -> None:
    log_path = os.environ.get(LOG_ENV)
    if log_path:
        with open(log_path, "a") as log:
            log.write(f"{source}\n")
