"""Unit tests start from the default settings, whatever the calling shell exports."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _defaults_only(clean_env: None) -> None:
    """Every unit test runs without OCRBOOTH_* variables (see `clean_env` in tests/conftest.py)."""
