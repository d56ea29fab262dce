"""`ocrbooth run` picks its event loop from `settings.event_loop`: uvloop by default where installed."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from ocrbooth.config import Settings
from ocrbooth.daemon import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_and_uvloop_run_on_uvloop() -> None:
    assert eventloop.resolve("auto") == "uvloop"  # a dependency of the package on Linux
    assert eventloop.run(_loop_module(), "auto").startswith("uvloop")
    assert eventloop.run(_loop_module(), "uvloop").startswith("uvloop")


def test_asyncio_runs_on_the_standard_loop() -> None:
    assert eventloop.resolve("asyncio") == "asyncio"
    assert eventloop.run(_loop_module(), "asyncio").startswith("asyncio")


def test_the_setting_is_checked() -> None:
    assert Settings().event_loop == "auto"
    with pytest.raises(ValidationError):
        Settings(event_loop="trio")  # type: ignore[arg-type]
