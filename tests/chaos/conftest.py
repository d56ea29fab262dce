"""Chaos-suite fixtures: every scenario hands its figures to `chaos_report`; the README check runs last."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator

import pytest

from tests.chaos.figures import MEASURED, REPORTED, Figures

_README_TEST = "tests/chaos/test_readme.py"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so `chaos_report` knows whether the test passed."""
    report = yield
    item.stash.setdefault(_PHASES, {})[report.when] = report
    return report


_PHASES = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The README check compares what the scenarios measured, so it runs after all of them."""
    last = [item for item in items if item.nodeid.startswith(_README_TEST)]
    if last:
        items[:] = [item for item in items if not item.nodeid.startswith(_README_TEST)] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every scenario's figures at the end of the run, passed or not."""
    if REPORTED:
        terminalreporter.section("chaos figures")
        for figures in REPORTED:
            terminalreporter.write_line(figures.line())


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Iterator[Callable[[Figures], None]]:
    """Record a scenario's figures: printed at once and in the summary, kept for the README if the test passes."""
    recorded: list[Figures] = []

    def record(figures: Figures) -> None:
        recorded.append(figures)
        REPORTED.append(figures)
        request.node.user_properties.append(("chaos", figures.line()))
        print(figures.line())

    yield record
    call = request.node.stash.get(_PHASES, {}).get("call")
    if call is not None and call.passed:
        for figures in recorded:
            MEASURED[figures.scenario] = figures
