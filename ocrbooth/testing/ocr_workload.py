"""The OCR benchmarks' page stream: two page sizes and a seeded mix of output lengths, shared by
`bench/ocr_throughput.py` (the engine alone) and `bench/ocr_end_to_end.py` (through the daemon), so both
measure the same workload.

Random weights never produce a stop token by themselves, so a page's output length is its `max_new_tokens`:
the mix below is the workload's length distribution. numpy, Pillow and PyMuPDF are imported only by the
functions that need them, so the engine benchmark runs where PyMuPDF is not installed.
"""

# PyMuPDF ships py.typed but leaves most of its functions unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

SIZES: Final = {"portrait": (1176, 1540), "landscape": (1540, 1000)}
"""Page sizes in pixels (width, height): an A4 page and a landscape page, longest side 1540 (LightOnOCR's)."""
STREAM_SEED: Final = 20261127
LENGTH_MIX: Final = ((0.15, (5, 100)), (0.60, (300, 900)), (0.25, (1200, 2500)))
"""(share of pages, (fewest, most) output tokens): short, medium and long pages."""


@dataclass(frozen=True, slots=True)
class StreamPage:
    """One page of the stream: its size (a key of SIZES), its output budget and which LENGTH_MIX bin it is."""

    size: str
    max_new_tokens: int
    kind: int


def stream_workload(count: int, seed: int = STREAM_SEED) -> list[StreamPage]:
    """`count` pages: the length bin, then the length within it, then the page size, all from one seeded
    generator (the order bench/ocr_throughput.py has always drawn them in, so its results stay comparable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(LENGTH_MIX), size=count, p=[share for share, _ in LENGTH_MIX])
    lengths = [int(rng.integers(LENGTH_MIX[k][1][0], LENGTH_MIX[k][1][1] + 1)) for k in kinds]
    names = list(SIZES)
    which = [names[int(i)] for i in rng.integers(0, len(names), size=count)]
    return [StreamPage(w, n, int(k)) for w, n, k in zip(which, lengths, kinds, strict=True)]


def distribution(pages: list[StreamPage]) -> dict[str, Any]:
    """Counts per length bin and size, and the mean output length, for a result file."""
    bins = ("short_5_100", "medium_300_900", "long_1200_2500")
    out: dict[str, Any] = {name: sum(p.kind == k for p in pages) for k, name in enumerate(bins)}
    out |= {f"{size}_pages": sum(p.size == size for p in pages) for size in SIZES}
    out["mean_tokens"] = sum(p.max_new_tokens for p in pages) / max(1, len(pages))
    out["total_tokens"] = sum(p.max_new_tokens for p in pages)
    return out


def noise_pages(seed: int = 0) -> dict[str, Any]:
    """One uniform-noise RGB image per size (PIL images): the engine benchmark's pages."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return {k: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for k, (w, h) in SIZES.items()}


def document_page_png(size: str, variant: int) -> bytes:
    """A born-digital text page of `size` (a key of SIZES) as an RGB PNG: paragraphs of the language samples
    typeset in Helvetica at 144 dpi, different for each `variant`. About 0.1-0.3 MB, as a scanned page
    saved losslessly would be, where a noise page of the same size is 5 MB."""
    import pymupdf

    from ocrbooth.testing.samples import LANGUAGE_SAMPLES

    width, height = SIZES[size]
    rng = random.Random(variant)
    texts = list(LANGUAGE_SAMPLES.values())
    fontsize = rng.choice((8.0, 9.0, 10.0))
    box = pymupdf.Rect(36, 36, width / 2 - 36, height / 2 - 36)

    def typeset(paragraphs: list[str]) -> tuple[Any, Any, bool]:
        doc = pymupdf.open()
        page = doc.new_page(width=width / 2, height=height / 2)  # points; rendered at zoom 2 = 144 dpi
        fits = page.insert_textbox(box, "\n\n".join(paragraphs), fontsize=fontsize, fontname="helv") >= 0
        return doc, page, fits

    paragraphs = [rng.choice(texts)]
    while True:  # as many paragraphs as fit the text box
        candidate = [*paragraphs, rng.choice(texts)]
        doc, page, fits = typeset(candidate)
        doc.close()
        if not fits:
            break
        paragraphs = candidate
    doc, page, _ = typeset(paragraphs)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(2, 2), alpha=False)
    if (pix.width, pix.height) != (width, height):
        raise AssertionError(f"rendered {pix.width}x{pix.height}, wanted {width}x{height}")
    data: bytes = pix.tobytes("png")
    doc.close()
    return data
