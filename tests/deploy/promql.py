"""Reading the PromQL in the Grafana dashboard: the expressions, Grafana's variables replaced so that Prometheus
can run them, and the selectors and grouping labels they use (regular expressions, enough for our own queries;
not a PromQL parser)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Grafana variable → what Prometheus gets when every namespace and job is selected.
SUBSTITUTIONS = {"$__rate_interval": "1m", "${namespace}": ".*", "$namespace": ".*", "${job}": ".*", "$job": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}(\s*\[)?")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel in the dashboard JSON at `path`."""
    dashboard = json.loads(path.read_text())
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def substitute(expr: str) -> str:
    """`expr` as Prometheus can run it: `$namespace` and `$job` match everything, `$__rate_interval` is 1m."""
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str, prefix: str = "ocrbooth_") -> set[str]:
    """Identifiers starting with `prefix` outside string literals (label values are not metric names)."""
    return set(re.findall(rf"\b{re.escape(prefix)}[a-z0-9_]+", _STRING.sub('""', expr)))


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]], bool]]:
    """(metric, {label: (operator, value)}, is_range) for each `metric{...}` selector; is_range when `[...]`
    follows it."""
    return [
        (match[1], {m[1]: (m[2], m[3]) for m in _MATCHER.finditer(match[2])}, match[3] is not None)
        for match in _SELECTOR.finditer(expr)
    ]


def grouping_labels(expr: str) -> set[str]:
    """Label names in `by`, `without`, `on`, `ignoring`, `group_left` and `group_right` clauses."""
    return {label.strip() for match in _GROUPING.finditer(expr) for label in match[2].split(",") if label.strip()}
