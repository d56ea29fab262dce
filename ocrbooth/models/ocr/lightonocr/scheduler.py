"""The engine's policy, as in vLLM v1's scheduler: pure code, no torch, no device.

`schedule()` decides what the next engine step does: which waiting pages enter free decode slots now (their
KV blocks reserved, their prefill launched), within a per-step prefill budget and the KV pool. The runner
executes that step; `update_from_output()` moves every page forward: a finished prefill starts decoding, a
finished page frees its slot and blocks at once, so the very next `schedule()` can admit the next page. Pages
join at any step; nothing waits for a batch to end.

Admission is first come, first served among pages whose inputs are ready (preprocessed on the CPU): the
first ready page that does not fit the free KV blocks stops admission for this step, so a large page is never
starved by small ones behind it.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from dataclasses import dataclass, field

from ocrbooth.models.ocr.lightonocr.kv_cache import BlockAllocator


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One page in the engine."""

    request_id: int
    prompt_tokens: int
    """Prompt length (template + image tokens); the last one is fed to the first decode step."""
    max_new_tokens: int
    ready: bool = False
    """Inputs preprocessed on the host: only ready pages are admitted."""
    status: Status = Status.WAITING
    slot: int = -1
    blocks: list[int] = field(default_factory=list)

    @property
    def reserve_tokens(self) -> int:
        """Positions the page may ever hold: its prompt and its whole output budget."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_slots: int
    """Pages decoding at once (rows of the decode step)."""
    block_size: int
    max_blocks_per_slot: int
    """Block-table width: the longest page a slot can hold."""
    max_prefill_tokens: int
    """Prompt tokens prefilled per step (a page longer than this still goes, alone)."""
    max_prefills_in_flight: int = 1
    """Prefill batches launched and not yet finished; more wait for the next step."""


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: int
    slot: int
    blocks: tuple[int, ...]
    prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """What one engine step runs."""

    admitted: tuple[Admission, ...]
    """Pages to prefill now (one batch), each into its slot."""
    decode: bool
    """Run a chunk of decode steps (some slot is decoding)."""
    slots_in_use: int
    """1 + the highest slot held: the decode step needs only that many rows."""


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: int
    reason: str


@dataclass(slots=True)
class StepResult:
    """What the runner reports back after a step."""

    prefilled: list[int] = field(default_factory=list)
    """Requests whose prefill finished: they decode from the next step."""
    prefill_batches_done: int = 0
    finished: list[Finished] = field(default_factory=list)
    """Requests that stopped decoding (stop token, budget, repetition) or failed in prefill."""


class Scheduler:
    """Slots, KV blocks and the waiting queue of one engine."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.requests: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()
        self._free_slots = list(range(config.max_slots))  # a heap: lowest slot first keeps the rows compact
        self._prefills_in_flight = 0

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def decoding(self) -> int:
        return sum(1 for r in self.requests.values() if r.status is Status.DECODING)

    @property
    def prefilling(self) -> int:
        return sum(1 for r in self.requests.values() if r.status is Status.PREFILLING)

    @property
    def slots_in_use(self) -> int:
        held = [r.slot for r in self.requests.values() if r.slot >= 0]
        return max(held) + 1 if held else 0

    def has_work(self) -> bool:
        return bool(self.requests)

    def max_tokens(self) -> int:
        """Largest prompt + output budget a page may have."""
        return min(self.allocator.capacity, self.config.max_blocks_per_slot) * self.config.block_size

    # ---- moves -----------------------------------------------------------------------------------

    def add_request(self, request: Request) -> str | None:
        """Queue a page; a page that could never fit gets the reason back instead (and is not queued)."""
        if request.reserve_tokens > self.max_tokens():
            return (
                f"page needs {request.prompt_tokens} prompt + {request.max_new_tokens} new tokens of KV cache; "
                f"a slot holds at most {self.max_tokens()}"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)
        return None

    def mark_ready(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            request.ready = True

    def schedule(self) -> SchedulerOutput:
        """Admit ready pages into free slots within the prefill budget and the free KV blocks."""
        admitted: list[Admission] = []
        if self._prefills_in_flight < self.config.max_prefills_in_flight:
            budget = self.config.max_prefill_tokens
            for request in list(self.waiting):
                if not self._free_slots:
                    break
                if not request.ready:
                    continue
                if admitted and request.prompt_tokens > budget:
                    break
                blocks = self.allocator.allocate(-(-request.reserve_tokens // self.config.block_size))
                if blocks is None:
                    break  # first come, first served: later pages wait for this one
                self.waiting.remove(request)
                request.slot = heapq.heappop(self._free_slots)
                request.blocks = blocks
                request.status = Status.PREFILLING
                budget -= request.prompt_tokens
                admitted.append(
                    Admission(
                        request.request_id, request.slot, tuple(blocks), request.prompt_tokens, request.max_new_tokens
                    )
                )
        if admitted:
            self._prefills_in_flight += 1
        return SchedulerOutput(tuple(admitted), self.decoding > 0, self.slots_in_use)

    def update_from_output(self, result: StepResult) -> list[Request]:
        """Advance pages: finished prefills decode, finished pages free their slot and blocks. Returns the
        pages that finished in this step."""
        self._prefills_in_flight -= result.prefill_batches_done
        for request_id in result.prefilled:
            request = self.requests.get(request_id)
            if request is not None and request.status is Status.PREFILLING:
                request.status = Status.DECODING
        done: list[Request] = []
        for finished in result.finished:
            request = self.requests.pop(finished.request_id, None)
            if request is None:
                continue
            self._release(request)
            done.append(request)
        return done

    def abort(self, request_id: int) -> Request | None:
        """Drop a page wherever it is (a failed preprocessing); frees what it held."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        self._release(request)
        return request

    def _release(self, request: Request) -> None:
        if request.slot >= 0:
            heapq.heappush(self._free_slots, request.slot)
            request.slot = -1
        if request.blocks:
            self.allocator.release(request.blocks)
            request.blocks = []
        request.status = Status.FINISHED
