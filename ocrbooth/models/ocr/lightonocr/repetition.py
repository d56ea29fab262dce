"""The repetition guard: its policy (`RepetitionGuard`) and its on-device tracker, updated inside the decode
step so a looping page stops without the host looking at every token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ocrbooth.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RepetitionGuard:
    """Stops a page whose output has started looping.

    The guard fires when the newest tokens are an exact repeat with some period `p` <= `max_period` (the
    last L tokens equal the L tokens `p` earlier, shifted), and that periodic tail is at least
    `max(min_repeats * p, min_tokens)` tokens long. `min_tokens` keeps legitimate repetition (rows of an
    empty table, dot leaders) from firing early: 256 tokens is some 30 identical 8-token rows in a row.
    """

    enabled: bool = True
    max_period: int = 256
    """Longest loop (in tokens) that is detected."""
    min_repeats: int = 4
    """A loop must have been output this many times over."""
    min_tokens: int = 256
    """...and cover at least this many tokens."""

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ConfigError(f"invalid repetition guard {self!r}: need max_period>=1, min_repeats>=2, min_tokens>=1")

    def thresholds(self) -> list[int]:
        """Tail length at which a loop of period p (1-based index) fires."""
        return [max(self.min_repeats * p, self.min_tokens) for p in range(1, self.max_period + 1)]

    def first_trigger(self, tokens: Sequence[int]) -> int | None:
        """Index of the token at which the guard would stop this stream, or None. Runs the device tracker."""
        if not self.enabled:
            return None
        tracker = RepetitionTracker(self, slots=1, device=torch.device("cpu"))
        active = torch.ones(1, dtype=torch.bool)
        for i, token in enumerate(tokens):
            if bool(tracker.update(torch.tensor([token]), active, 1)[0]):
                return i
        return None


class RepetitionTracker:
    """RepetitionGuard on the device: for every period p, how many consecutive newest tokens equal the token
    p steps before them. history[:, p-1] is the token p steps back."""

    def __init__(self, guard: RepetitionGuard, *, slots: int, device: torch.device) -> None:
        self.enabled = guard.enabled
        periods = guard.max_period
        self.history = torch.full((slots, periods), -1, dtype=torch.long, device=device)
        self.runs = torch.zeros((slots, periods), dtype=torch.long, device=device)
        self.fire_at = torch.tensor(guard.thresholds(), dtype=torch.long, device=device) - torch.arange(
            1, periods + 1, device=device
        )  # runs_p + p >= threshold_p

    def reset(self, slots: torch.Tensor) -> None:
        """Forget the history of these slots (a new page starts there)."""
        self.history.index_fill_(0, slots, -1)
        self.runs.index_fill_(0, slots, 0)

    def update(self, tokens: torch.Tensor, active: torch.Tensor, rows: int) -> torch.Tensor:
        """Feed one token to each of the first `rows` slots; True where that slot's output is now looping."""
        if not self.enabled:
            return torch.zeros_like(active)
        history, runs = self.history[:rows], self.runs[:rows]
        same = history == tokens[:, None]
        runs.copy_(torch.where(same, runs + 1, 0))
        history.copy_(torch.cat([tokens[:, None], history[:, :-1]], dim=1))
        return (runs >= self.fire_at).any(dim=1) & active
