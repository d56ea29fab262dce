"""GPU tier: runs on the device machine only; everywhere else every test here is skipped with the reason."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well, so the tier also runs with `-c /dev/null` where the project's extras are absent.
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs on the device machine only)")


@pytest.fixture(scope="session", autouse=True)
def _cuda_device() -> None:
    """Skip this directory's tests (before any session fixture builds models) unless CUDA is usable."""
    try:
        import torch
    except ImportError:
        pytest.skip("tests/gpu needs torch (the `gpu` extra) and a CUDA device")
    if not torch.cuda.is_available():
        pytest.skip("tests/gpu needs a CUDA device; they run on the device machine only")
