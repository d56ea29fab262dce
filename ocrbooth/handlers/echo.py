"""`echo`: a diagnostic handler that answers each DocumentRequest without running OCR.

It exercises everything around the engines (decoding, publishing, offloading, offsets, retries) for smoke
tests, load tests and the runtime benchmark, through the same per-message path as every other handler.
Results say `engine: "echo"` and carry no recognised text. With `OCRBOOTH_ECHO_FAULTS=true` it also obeys
fault-injection keys in the request's metadata (`echo.delay_ms`, `echo.fail`, `echo.pad_bytes`); never enable
that in production.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence

from ocrbooth.errors import FatalError, PoisonError, RetryableError
from ocrbooth.handlers.base import Handler
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.schemas import DocumentRequest, ErrorInfo, OcrResult, PageResult, Timings

FAULTS_ENV = "OCRBOOTH_ECHO_FAULTS"
# Echo spends no time on stages: one shared (frozen) instance instead of the default factory's new one per result.
_NO_TIMINGS = Timings()


class EchoHandler(Handler[DocumentRequest]):
    """Answers every DocumentRequest with an empty succeeded OcrResult from engine `echo`."""

    name = "echo"

    def input_topics(self) -> Mapping[str, type[DocumentRequest]]:
        return {self.settings.topics.ocr_requests: DocumentRequest}

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.faults = os.environ.get(FAULTS_ENV, "").lower() in ("1", "true", "yes")

    async def handle(self, event: DocumentRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        # Real handlers await their work (S3, the render pool, the engine); echo yields to the event loop once,
        # so that its message's task is suspended inside the handler as theirs is: the runtime benchmark
        # measures the path every handler takes, suspension included.
        await asyncio.sleep(0)
        pages: list[PageResult] = []
        if self.faults:
            await self._inject(event, ctx)
            pad = int(event.metadata.get("echo.pad_bytes", "0"))
            if pad:
                pages.append(PageResult(page_number=1, width_px=0, height_px=0, text="x" * pad, finish_reason="stop"))
        # model_validate: the constructor's validation, without BaseModel.__init__'s keyword path (0.8 us a result).
        result = OcrResult.model_validate(
            {
                "request_id": event.request_id,
                "document_id": event.document_id,
                "status": "succeeded",
                "engine": "echo",
                "pages": pages,
                "timings_ms": _NO_TIMINGS,
                "metadata": event.metadata,
            }
        )
        return [OutputEvent(self.settings.topics.ocr_results, event.document_id, result)]

    def failure_outputs(self, event: DocumentRequest, ctx: MessageContext, error: ErrorInfo) -> Sequence[OutputEvent]:
        result = OcrResult.failure(event, error, "echo")
        return [OutputEvent(self.settings.topics.ocr_results, event.document_id, result)]

    @staticmethod
    async def _inject(event: DocumentRequest, ctx: MessageContext) -> None:
        delay_ms = float(event.metadata.get("echo.delay_ms", "0"))
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        fail = event.metadata.get("echo.fail", "")
        if fail == "poison":
            raise PoisonError("injected poison failure", code="injected_failure")
        if fail == "crash":
            raise RuntimeError("injected handler bug")
        if fail == "fatal":
            raise FatalError("injected fatal failure")
        if fail.startswith("retryable"):
            # "retryable:N" fails the first N attempts, then succeeds; plain "retryable" always fails.
            _, _, times = fail.partition(":")
            if not times or ctx.attempt <= int(times):
                raise RetryableError("injected transient failure", code="injected_transient")
