"""The engine core: `EngineCore`, the step loop on one thread per device (vLLM v1's `engine/core.py`).

Each step: take new pages → `scheduler.schedule()` (pure policy: which pages enter free slots now) → the runner
launches that step (a prefill batch on the prefill stream, a chunk of decode steps on the main stream) →
`scheduler.update_from_output()` (finished prefills start decoding, finished pages free their slot and KV blocks
at once). Pages are preprocessed on helper threads ahead of admission; finished pages are detokenized and scored
on an output thread; results reach the event loop as futures. Nothing waits for a batch to end. The engine it
serves (`engine.py`) loads the model and sizes the KV cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ocrbooth.errors import FatalError
from ocrbooth.models.ocr.engine import PageInput, PageOutput, StepStats
from ocrbooth.models.ocr.lightonocr.detokenize import PageGeneration, failed, to_output
from ocrbooth.models.ocr.lightonocr.inputs import PreparedPage
from ocrbooth.models.ocr.lightonocr.kv_cache import BlockAllocator
from ocrbooth.models.ocr.lightonocr.runner import Prefill, PrefillItem, SlotOutput
from ocrbooth.models.ocr.lightonocr.scheduler import Finished, Request, Scheduler, SchedulerConfig, StepResult

if TYPE_CHECKING:  # engine.py imports this module to start cores; only the type comes back
    from ocrbooth.models.ocr.lightonocr.engine import LightOnOcrEngine

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Launched:
    """A prefill batch once launched: its runner handles, and the pages that could not be launched."""

    prefills: list[Prefill]
    failed: list[tuple[PrefillItem, str, str]]  # (page, error code, message): they fail alone
    split: bool = False  # the batch failed as a whole and went page by page


@dataclass(slots=True, eq=False)
class _Page:
    page: PageInput
    future: Future[PageGeneration]
    request: Request | None = None
    prepared: Future[PreparedPage] | None = None
    submitted_at: float = field(default_factory=time.monotonic)


class EngineCore:
    """One thread per device running schedule → execute → update_from_output until stopped."""

    def __init__(
        self,
        engine: LightOnOcrEngine,
        *,
        span_threshold: float,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self._span_threshold = span_threshold
        self._on_step = on_step
        runner = engine.runner
        cap = engine.capacity
        assert cap is not None
        cfg = engine.config
        self._runner = runner
        self._scheduler = Scheduler(
            SchedulerConfig(
                max_slots=cap.max_slots,
                block_size=cap.block_size,
                max_blocks_per_slot=-(-cap.max_page_tokens // cap.block_size),
                max_prefill_tokens=cfg.max_prefill_tokens,
            ),
            BlockAllocator(cap.num_blocks),
        )
        self._cond = threading.Condition()
        self._inbox: list[_Page] = []
        self._pages: dict[int, _Page] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._fatal: BaseException | None = None
        self._prefills: list[Future[_Launched]] = []
        self._launcher: ThreadPoolExecutor | None = None
        self._thread = threading.Thread(target=self._run, name=f"ocr-{engine.name}", daemon=True)
        self._preprocess: ThreadPoolExecutor | None = None
        self._outputs: ThreadPoolExecutor | None = None
        self.busy_seconds = 0.0
        self.steps = 0
        self._splits = 0

    def start(self) -> None:
        with self.engine._core_guard:  # one core per runner: two would each read the other's slots
            if self.engine._active_core is not None:
                raise RuntimeError("this LightOnOcrEngine already has a running engine core")
            self.engine._active_core = self
        self._preprocess = ThreadPoolExecutor(
            self.engine.config.preprocess_threads, thread_name_prefix=f"{self.engine.name}-preprocess"
        )
        self._outputs = ThreadPoolExecutor(1, thread_name_prefix=f"{self.engine.name}-output")
        if self.engine.config.prefill_thread and self._runner.prefill_overlap != "serial":
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix=f"{self.engine.name}-prefill")
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish every page already submitted, then end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # still draining: its pools and the runner stay its own
            log.warning("LightOnOCR engine core still busy after %.0f s; left running", timeout_s)
            return
        for pool in (self._preprocess, self._outputs, self._launcher):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=False)
        with self.engine._core_guard:
            if self.engine._active_core is self:
                self.engine._active_core = None

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._inbox) + len(self._scheduler.waiting)

    async def submit(self, page: PageInput) -> PageOutput:
        """Queue one page and wait for its output."""
        generation = await asyncio.wrap_future(self.submit_generation(page))
        return to_output(generation, span_threshold=self._span_threshold)

    def submit_generation(self, page: PageInput) -> Future[PageGeneration]:
        """Thread-safe: queue one page; the future gets its tokens, probabilities and text."""
        future: Future[PageGeneration] = Future()
        with self._cond:
            if self._fatal is not None:
                raise FatalError(f"OCR engine {self.engine.name} is broken: {self._fatal}")
            if self._stopping:
                raise FatalError("OCR engine is stopping")
            self._inbox.append(_Page(page, future))
            self._cond.notify_all()
        return future

    # ---- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._runner.serving():
                    if not self._step():
                        break
        except Exception as exc:  # a broken device or an engine bug: every page fails, later submits too
            log.exception("LightOnOCR engine core failed")
            fatal = exc if isinstance(exc, FatalError) else FatalError(f"LightOnOCR engine failed: {exc!r}")
            with self._cond:
                self._fatal = fatal
                pages, self._inbox = [*self._pages.values(), *self._inbox], []
                self._pages.clear()
            for entry in pages:
                if not entry.future.done():
                    entry.future.set_exception(fatal)

    def _step(self) -> bool:
        """One engine step; False when stopped and drained."""
        with self._cond:
            while not self._inbox and not self._scheduler.has_work():
                if self._stopping:
                    return False
                self._cond.wait()
            new, self._inbox = self._inbox, []
        started = time.perf_counter()
        self._splits = 0
        for entry in new:
            self._intake(entry)
        self._prefetch()
        scheduled = self._scheduler.schedule()
        result = StepResult()
        runner = self._runner
        decoding = self._scheduler.decoding > 0
        # The decode chunk first: launching a prefill batch inline holds this thread about as long as the GPU
        # takes to run it (its thousands of launches wait on the driver's queue; results/
        # ocr_throughput_h100_prefill_launch.json), so the chunk queued before it keeps the decode stream busy.
        if decoding:
            runner.launch_chunk(scheduled.slots_in_use, self.engine.config.steps_per_sync)
        if scheduled.admitted:
            self._launch_prefill(scheduled.admitted, result)
        # Read the previous chunk's snapshot while this one runs (or the last one, when nothing new was queued).
        if runner.chunks_in_flight > 1 or (runner.chunks_in_flight and not decoding):
            for output in runner.collect():
                result.finished.append(Finished(output.request_id, output.reason))
                self._emit(output)
        self._finish_prefills(result, wait=not decoding)
        for request in self._scheduler.update_from_output(result):
            self._pages.pop(request.request_id, None)
        if not decoding and not self._prefills and not scheduled.admitted:
            self._wait_for_inputs()
        self.steps += 1
        elapsed = time.perf_counter() - started
        self.busy_seconds += elapsed
        if self._on_step is not None:
            self._on_step(
                StepStats(
                    pages=self._scheduler.decoding,
                    tokens=self.engine.config.steps_per_sync if decoding else 0,
                    seconds=elapsed,
                    splits=self._splits,
                    admitted=len(scheduled.admitted),
                    finished=len(result.finished),
                    step=self.steps,
                )
            )
        return True

    def _intake(self, entry: _Page) -> None:
        page = entry.page
        try:
            if page.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {page.max_new_tokens}")
            prompt = self.engine.prompt_length(page)
        except (ValueError, TypeError, OSError) as exc:  # the page itself is unusable
            entry.future.set_result(failed("unprocessable_page", f"{type(exc).__name__}: {exc}"))
            return
        request_id = next(self._ids)
        request = Request(request_id, prompt, page.max_new_tokens)
        if page.max_new_tokens > self.engine.config.max_new_tokens:
            reason: str | None = (
                f"max_new_tokens {page.max_new_tokens} is over the engine's {self.engine.config.max_new_tokens}"
            )
        else:
            reason = self._scheduler.add_request(request)
        if reason is not None:
            entry.future.set_result(failed("page_too_large", reason))
            return
        entry.request = request
        self._pages[request_id] = entry

    def _prefetch(self) -> None:
        """Preprocess the first waiting pages on the helper threads; mark those done ready."""
        assert self._preprocess is not None
        ahead = 0
        for request in list(self._scheduler.waiting):
            entry = self._pages[request.request_id]
            if entry.prepared is None:
                if ahead >= self.engine.config.prefetch_pages:
                    break
                entry.prepared = self._preprocess.submit(self.engine.builder.prepare, entry.page)
            ahead += 1
            if request.ready or not entry.prepared.done():
                continue
            exc = entry.prepared.exception()
            if exc is None:
                prepared = entry.prepared.result()
                if prepared.prompt_length != request.prompt_tokens:
                    exc = RuntimeError(f"prompt of {prepared.prompt_length} tokens, {request.prompt_tokens} predicted")
            if exc is None:
                self._scheduler.mark_ready(request.request_id)
            else:
                self._scheduler.abort(request.request_id)
                self._pages.pop(request.request_id, None)
                entry.future.set_result(failed("unprocessable_page", f"{type(exc).__name__}: {exc}"))

    def _wait_for_inputs(self) -> None:
        """Nothing on the GPU: sleep until a page's preprocessing ends or a new page arrives."""
        pending = [e.prepared for e in self._pages.values() if e.prepared is not None and not e.prepared.done()]
        if pending:
            from concurrent.futures import FIRST_COMPLETED, wait

            wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)

    def _launch_prefill(self, admitted: Sequence[Any], result: StepResult) -> None:
        items = []
        for admission in admitted:
            entry = self._pages[admission.request_id]
            assert entry.prepared is not None
            items.append(
                PrefillItem(
                    admission.request_id,
                    admission.slot,
                    admission.blocks,
                    admission.max_new_tokens,
                    entry.prepared.result(),
                )
            )
            entry.prepared = None  # the runner has the pixels now; drop the host copy with them
        if self._launcher is not None:  # the decode loop goes on launching chunks meanwhile
            self._prefills.append(self._launcher.submit(self._launch, items))
            return
        launched: Future[_Launched] = Future()
        launched.set_result(self._launch(items))  # a FatalError propagates from here, as from the launcher
        self._prefills.append(launched)

    def _launch(self, items: list[PrefillItem]) -> _Launched:
        """Launch one prefill batch (on the launcher thread, or inline); a batch that fails as a whole goes
        page by page, so that one bad page fails alone. Touches only the runner's prefill side."""
        paced = self._launcher is not None
        try:
            return _Launched([self._runner.launch_prefill(items, paced=paced)], [])
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            if _device_broken(exc):
                raise FatalError(f"CUDA failure in LightOnOCR: {exc}") from exc
        except (ValueError, TypeError, IndexError) as exc:
            log.warning("prefill batch of %d failed (%r); prefilling its pages one by one", len(items), exc)
        launched = _Launched([], [], split=True)
        for item in items:
            try:
                launched.prefills.append(self._runner.launch_prefill([item], paced=paced))
            except (torch.OutOfMemoryError, RuntimeError, ValueError, TypeError, IndexError) as exc:
                if isinstance(exc, RuntimeError) and _device_broken(exc):
                    raise FatalError(f"CUDA failure in LightOnOCR: {exc}") from exc
                code = "out_of_memory" if isinstance(exc, torch.OutOfMemoryError) else "ocr_failed"
                launched.failed.append((item, code, f"{type(exc).__name__}: {exc}"))
        return launched

    def _finish_prefills(self, result: StepResult, *, wait: bool) -> None:
        """Activate prefill batches whose stream work is done (waiting for them when nothing else runs);
        fail the pages that could not be launched."""
        still = []
        for pending in self._prefills:
            if not wait and not pending.done():
                still.append(pending)
                continue
            launched = pending.result()  # re-raises a FatalError of the launch
            if launched.split:
                self._splits += 1
                launched.split = False
            for item, code, message in launched.failed:
                self._runner.forget(item.slot)
                result.finished.append(Finished(item.request_id, "error"))
                self._pages[item.request_id].future.set_result(failed(code, message))
            launched.failed.clear()
            if wait:
                for prefill in launched.prefills:
                    if prefill.event is not None:
                        prefill.event.synchronize()
            if all(prefill.done() for prefill in launched.prefills):
                for prefill in launched.prefills:
                    self._runner.activate(prefill, self._runner.chunk)
                    result.prefilled.extend(item.request_id for item in prefill.items)
                result.prefill_batches_done += 1
            else:
                still.append(pending)
        self._prefills = still

    def _emit(self, output: SlotOutput) -> None:
        entry = self._pages.get(output.request_id)
        if entry is None:
            return
        assert self._outputs is not None
        self._outputs.submit(self._deliver, entry, output)

    def _deliver(self, entry: _Page, output: SlotOutput) -> None:
        """Output thread: wait for the copy, detokenize, resolve the page's future."""
        try:
            tokens, probs = output.wait()
            generation = PageGeneration(tokens, probs, output.reason)  # type: ignore[arg-type]
            self.engine.detokenizer.finish(generation)
        except Exception as exc:  # a tokenizer failure fails this page, not the engine
            generation = failed("ocr_failed", f"{type(exc).__name__}: {exc}")
        entry.future.set_result(generation)


def _device_broken(exc: RuntimeError) -> bool:
    """A CUDA error other than out-of-memory leaves the context unusable (sticky errors): restart the process."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc)
    return any(marker in message for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert"))
