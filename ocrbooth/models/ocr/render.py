"""Document bytes to page images, bounded for the OCR model. Pure, synchronous, CPU-bound.

The format is decided by the bytes, never by a file name. PDFs render with PyMuPDF with the longest side at
`render_longest_px` (the size LightOnOCR was trained at) but never above `max_dpi`; images are downscaled to
the same bound and never upscaled. Every way an input can be unprocessable raises `PoisonError` with its own
code: `unsupported_format`, `corrupt_document`, `encrypted_document`, `too_many_pages`, `image_too_large`,
`page_out_of_range`, `render_out_of_memory` (MuPDF could not allocate: the worker's memory cap was reached).
`inspect_file` and `render_file_page` are the tasks the render pool's worker processes run.

Meant for a worker pool. Pillow work runs in parallel across threads; PyMuPDF is not thread-safe, so its
calls are serialised by a lock (use a process pool to render PDFs in parallel).
"""

# PyMuPDF ships py.typed but leaves most of its functions unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import math
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, cast

import pymupdf
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, TiffImagePlugin, WebPImagePlugin

from ocrbooth.errors import PoisonError

DocFormat = Literal["pdf", "png", "jpeg", "tiff", "webp"]

_PDF_POINTS_PER_INCH = 72.0
_INK_LEVEL = 200  # grey value below which a pixel counts as ink
_BLANK_INK_FRACTION = 0.0001  # a lone "Page 1" has about twice this; one stray letter or dust has less
_PDF_EOF_WINDOW = 1024  # readers look for %%EOF only within the last 1024 bytes

# Pillow's per-format parsers. Calling them directly (not Image.open) skips Pillow's global
# MAX_IMAGE_PIXELS check, which would raise or warn before we could map the size to `image_too_large`.
_RASTER_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "png": PngImagePlugin.PngImageFile,
    "jpeg": JpegImagePlugin.JpegImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}
# What Pillow raises on malformed input (zlib.error and struct.error from PNG/TIFF internals).
_PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
    zlib.error,
)
# What PyMuPDF raises on malformed input: FileDataError is a RuntimeError; raw MuPDF errors are FzErrorBase.
_MUPDF_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase)
# MuPDF reports a failed allocation (the worker's address-space cap) as a system error naming the allocator.
_MUPDF_OOM = re.compile(r"\b(malloc|calloc|realloc)\b.*failed|out of memory", re.IGNORECASE)
# Warnings MuPDF gives when it pads a cut-off image stream (JPEG or Flate) with grey instead of failing.
_MUPDF_TRUNCATION = re.compile(r"premature end of|truncated image|unexpected end of", re.IGNORECASE)
# An inline image (`BI <dict> ID <data> EI`) in a content stream: MuPDF decodes it at full size while drawing,
# and page.get_images() does not list it. The dict is short; its W/H are read without decoding anything.
_INLINE_IMAGE = re.compile(rb"(?:^|[\s\]>)}])BI\s(.{0,4096}?)\sID\s", re.DOTALL)
_INLINE_SIZE = re.compile(rb"/(W|Width|H|Height)\s+(\d{1,12})\b")

# MuPDF reports every repair it makes of a broken file; keep that off stdout/stderr.
pymupdf.TOOLS.mupdf_display_errors(False)
pymupdf.TOOLS.mupdf_display_warnings(False)
_MUPDF_LOCK = threading.Lock()  # PyMuPDF shares one global context and is not safe across threads


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """Render size and the bounds that keep hostile documents cheap to reject."""

    render_longest_px: int = 1540
    """Longest side of a rendered page, in pixels (LightOnOCR's training size)."""
    max_dpi: int = 200
    """PDF pages are never rendered above this resolution, so small pages are not blown up."""
    max_pages: int = 500
    """Most pages one document may ask to render (the selection, or the whole document)."""
    max_image_pixels: int = 80_000_000
    """Largest image (width x height) decoded, read from the header before decoding; also applies to
    images embedded in PDF pages, which MuPDF would decode at full size."""

    def __post_init__(self) -> None:
        for name in ("render_longest_px", "max_dpi", "max_pages", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"RenderLimits.{name} must be at least 1")


@dataclass(frozen=True, slots=True)
class RenderedPage:
    """One page as the OCR engine gets it."""

    page_number: int
    """1-based page (TIFF: frame) number in the document."""
    image: Image.Image
    """RGB image, longest side at most `render_longest_px`."""
    width_px: int
    height_px: int
    blank: bool
    """The page has (almost) no ink, so an empty OCR result is expected, not a failure."""


@dataclass(frozen=True, slots=True)
class PagePixels:
    """A rendered page as the render pool sends it back: raw RGB rows, so the parent builds the image without
    a copy (pickling a PIL image would copy it twice on each side)."""

    page_number: int
    width_px: int
    height_px: int
    blank: bool
    pixels: bytes

    @property
    def nbytes(self) -> int:
        return len(self.pixels)

    def image(self) -> Image.Image:
        """The page as an RGB image sharing this object's buffer."""
        return Image.frombuffer("RGB", (self.width_px, self.height_px), self.pixels, "raw", "RGB", 0, 1)


def page_bytes_bound(limits: RenderLimits) -> int:
    """Most bytes one rendered page can hold (RGB, longest side at the render size), known before rendering."""
    return limits.render_longest_px * limits.render_longest_px * 3


def inspect_file(path: str) -> tuple[DocFormat, int]:
    """Format and page count of the document stored at `path` (a render pool task)."""
    fmt = sniff_format(_head(path))
    with _open(Path(path), fmt) as doc:
        return fmt, doc.page_count


def render_file_page(path: str, fmt: DocFormat, page_number: int, limits: RenderLimits) -> PagePixels:
    """Render one page of the document stored at `path` (a render pool task). The file is opened, not read
    whole: MuPDF and Pillow read what the page needs, so a large document costs the worker little memory."""
    with _open(Path(path), fmt) as doc:
        _check_page(page_number, doc.page_count)
        page = doc.render(page_number, limits)
    image = page.image
    return PagePixels(page.page_number, page.width_px, page.height_px, page.blank, image.tobytes())


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024)


def sniff_format(data: bytes) -> DocFormat:
    """The document format from its magic bytes; `PoisonError(unsupported_format)` for anything else."""
    if not data:
        raise PoisonError("empty document", code="unsupported_format")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic and BigTIFF
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if b"%PDF-" in data[:1024]:  # readers accept junk (mail headers, BOMs) before the header
        return "pdf"
    raise PoisonError(f"unsupported document format (starts with {data[:8]!r})", code="unsupported_format")


def page_count(data: bytes, fmt: DocFormat | None = None) -> int:
    """Pages in the document (TIFF: frames; other images: 1). Raises PoisonError for unreadable documents."""
    with _open(data, fmt or sniff_format(data)) as doc:
        return doc.page_count


def resolve_pages(
    data: bytes, pages: Sequence[int] | None = None, limits: RenderLimits = RenderLimits()
) -> tuple[DocFormat, list[int]]:
    """Sniff, open and check the document, and return its format and the sorted, de-duplicated 1-based page
    numbers to render; for callers that then call `render_page` one page at a time. Renders nothing."""
    fmt = sniff_format(data)
    with _open(data, fmt) as doc:
        return fmt, _select(doc.page_count, pages, limits)


def render_document(
    data: bytes, *, pages: Sequence[int] | None = None, limits: RenderLimits = RenderLimits()
) -> list[RenderedPage]:
    """Render the selected 1-based `pages` (all when None) in ascending order, each at most once.

    The page count and selection are checked before any page is rendered."""
    fmt = sniff_format(data)
    with _open(data, fmt) as doc:
        return [doc.render(n, limits) for n in _select(doc.page_count, pages, limits)]


def render_page(data: bytes, fmt: DocFormat, page_number: int, limits: RenderLimits) -> RenderedPage:
    """Render one 1-based page; pair with `resolve_pages` to overlap rendering with OCR."""
    with _open(data, fmt) as doc:
        _check_page(page_number, doc.page_count)
        return doc.render(page_number, limits)


def _select(count: int, pages: Sequence[int] | None, limits: RenderLimits) -> list[int]:
    selected = list(range(1, count + 1)) if pages is None else sorted(set(pages))
    for n in selected:
        _check_page(n, count)
    if len(selected) > limits.max_pages:
        raise PoisonError(
            f"{len(selected)} pages to render, more than the limit of {limits.max_pages}", code="too_many_pages"
        )
    return selected


def _check_page(page_number: int, count: int) -> None:
    if not 1 <= page_number <= count:
        raise PoisonError(f"page {page_number} requested, document has {count}", code="page_out_of_range")


class _Document(Protocol):
    page_count: int

    def render(self, page_number: int, limits: RenderLimits) -> RenderedPage: ...


@contextmanager
def _open(data: bytes | Path, fmt: DocFormat) -> Iterator[_Document]:
    if fmt == "pdf":
        pdf = _PdfDocument(data)
        try:
            yield pdf
        finally:
            pdf.close()
    else:
        raster = _RasterDocument(data, fmt)
        try:
            yield raster
        finally:
            raster.close()


class _PdfDocument:
    def __init__(self, data: bytes | Path) -> None:
        with _MUPDF_LOCK:
            try:
                if isinstance(data, Path):
                    self._doc = pymupdf.open(str(data), filetype="pdf")
                    data = _tail(data)
                else:
                    self._doc = pymupdf.open(stream=data, filetype="pdf")
            except _MUPDF_ERRORS as exc:
                pymupdf.TOOLS.reset_mupdf_warnings()
                raise PoisonError(f"unreadable PDF: {exc}", code="corrupt_document") from exc
            checked = False
            try:
                self.page_count = self._check(data)
                checked = True
            finally:
                if not checked:
                    self._doc.close()
                # PyMuPDF keeps every MuPDF warning in a process-wide list; a long-lived worker must drain it.
                pymupdf.TOOLS.reset_mupdf_warnings()

    def _check(self, data: bytes) -> int:
        if self._doc.needs_pass:
            raise PoisonError("PDF is password-protected", code="encrypted_document")
        try:
            count = int(self._doc.page_count)
        except _MUPDF_ERRORS as exc:
            raise PoisonError(f"unreadable PDF page tree: {exc}", code="corrupt_document") from exc
        # MuPDF silently rebuilds a cut-off file from whatever objects survive; OCRing the remains of an
        # interrupted upload would return a partial document as if it were whole.
        if self._doc.is_repaired and b"%%EOF" not in data[-_PDF_EOF_WINDOW:]:
            raise PoisonError("PDF is truncated (no %%EOF trailer)", code="corrupt_document")
        if count < 1:
            raise PoisonError("PDF has no pages", code="corrupt_document")
        return count

    def render(self, page_number: int, limits: RenderLimits) -> RenderedPage:
        with _MUPDF_LOCK:
            try:
                image = self._render(page_number, limits)
                warnings = pymupdf.TOOLS.mupdf_warnings()
            except _MUPDF_ERRORS as exc:
                if _MUPDF_OOM.search(str(exc)):
                    raise PoisonError(
                        f"page {page_number} needs more memory than a render worker may use: {exc}",
                        code="render_out_of_memory",
                    ) from exc
                raise PoisonError(f"page {page_number} failed to render: {exc}", code="corrupt_document") from exc
            finally:
                pymupdf.TOOLS.reset_mupdf_warnings()
        cut = _MUPDF_TRUNCATION.search(warnings)
        if cut:
            # A cut-off JPEG or Flate image would be OCRed as a grey band; say the upload is broken instead.
            line = next(w for w in warnings.splitlines() if _MUPDF_TRUNCATION.search(w))
            raise PoisonError(f"page {page_number} embeds a truncated image ({line})", code="corrupt_document")
        return _rendered(page_number, image)

    def _render(self, page_number: int, limits: RenderLimits) -> Image.Image:
        # Called under the lock; the Page and Pixmap die when this returns, still under it.
        page = self._doc[page_number - 1]
        rect = page.rect
        width_pt, height_pt = float(rect.width), float(rect.height)
        if not (math.isfinite(width_pt) and math.isfinite(height_pt)) or width_pt <= 0 or height_pt <= 0:
            raise PoisonError(f"page {page_number} has no area ({rect})", code="corrupt_document")
        zoom = min(limits.render_longest_px / max(width_pt, height_pt), limits.max_dpi / _PDF_POINTS_PER_INCH)
        width_px, height_px = max(1, round(width_pt * zoom)), max(1, round(height_pt * zoom))
        if width_px * height_px > limits.max_image_pixels:  # reachable only with a large render_longest_px
            raise PoisonError(f"page {page_number} would render at {width_px}x{height_px} px", code="image_too_large")
        # The page bitmap is bounded by construction, but MuPDF decodes embedded images at full size first.
        for xref, _smask, w, h, *_ in page.get_images(full=True):
            if int(w) * int(h) > limits.max_image_pixels:
                raise PoisonError(
                    f"page {page_number} embeds a {w}x{h} image (object {xref}), more than "
                    f"{limits.max_image_pixels} pixels",
                    code="image_too_large",
                )
        for w, h in _inline_image_sizes(self._doc, page):
            if w * h > limits.max_image_pixels:
                raise PoisonError(
                    f"page {page_number} has a {w}x{h} inline image, more than {limits.max_image_pixels} pixels",
                    code="image_too_large",
                )
        pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
        image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples, "raw", "RGB", pix.stride)
        if image.size != (width_px, height_px):
            # MuPDF rounds a fractional page origin outwards, which can add a row or column.
            image = image.crop((0, 0, min(width_px, image.width), min(height_px, image.height)))
        return image

    def close(self) -> None:
        with _MUPDF_LOCK:
            self._doc.close()


def _tail(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - _PDF_EOF_WINDOW))
        return f.read()


def _inline_image_sizes(doc: pymupdf.Document, page: pymupdf.Page) -> Iterator[tuple[int, int]]:
    """(width, height) of every inline image in the page's content and in the form XObjects it draws, read
    from the image dictionaries without decoding them; each form is read once however often it is drawn."""
    streams = [page.read_contents()]
    streams.extend(doc.xref_stream(xref) or b"" for xref in {x[0] for x in page.get_xobjects()})
    for stream in streams:
        for match in _INLINE_IMAGE.finditer(stream):
            entries = {key[:1]: int(value) for key, value in _INLINE_SIZE.findall(match.group(1))}
            if b"W" in entries and b"H" in entries:
                yield entries[b"W"], entries[b"H"]


class _RasterDocument:
    def __init__(self, data: bytes | Path, fmt: DocFormat) -> None:
        self._fmt = fmt
        # A file is kept open while the image is: Pillow reads frames from it lazily.
        self._file = data.open("rb") if isinstance(data, Path) else io.BytesIO(data)
        try:
            self._image = _RASTER_OPENERS[fmt](self._file)
            # Only TIFF pages are frames; an animated PNG or WebP is one picture.
            self.page_count = int(getattr(self._image, "n_frames", 1)) if fmt == "tiff" else 1
        except Image.DecompressionBombError as exc:
            self._file.close()
            raise PoisonError(str(exc), code="image_too_large") from exc
        except _PILLOW_ERRORS as exc:
            self._file.close()
            raise PoisonError(f"unreadable {fmt.upper()} image: {exc}", code="corrupt_document") from exc

    def render(self, page_number: int, limits: RenderLimits) -> RenderedPage:
        try:
            image = self._decode(page_number, limits)
        except Image.DecompressionBombError as exc:
            raise PoisonError(str(exc), code="image_too_large") from exc
        except _PILLOW_ERRORS as exc:
            raise PoisonError(
                f"{self._fmt.upper()} page {page_number} failed to decode: {exc}", code="corrupt_document"
            ) from exc
        return _rendered(page_number, image)

    def _decode(self, page_number: int, limits: RenderLimits) -> Image.Image:
        im = self._image
        if self._fmt == "tiff":
            im.seek(page_number - 1)
        width, height = im.size
        if width < 1 or height < 1:
            raise PoisonError(f"image page {page_number} is {width}x{height} px", code="corrupt_document")
        if width * height > limits.max_image_pixels:  # from the header: nothing decoded yet
            raise PoisonError(
                f"image is {width}x{height} px, more than {limits.max_image_pixels} pixels", code="image_too_large"
            )
        scale = min(1.0, limits.render_longest_px / max(width, height))
        if scale < 1.0 and self._fmt == "jpeg":
            # libjpeg decodes directly at 1/2, 1/4 or 1/8 size, never below the requested size.
            im.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        im.load()
        oriented = ImageOps.exif_transpose(im) or im
        rgb = _to_rgb(oriented)
        if max(rgb.size) > limits.render_longest_px:
            fit = limits.render_longest_px / max(rgb.size)
            size = (max(1, round(rgb.width * fit)), max(1, round(rgb.height * fit)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return rgb

    def close(self) -> None:
        self._image.close()
        self._file.close()


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB on white: transparency is composited (transparent pixels are often stored black), and
    high-bit-depth greyscale is scaled down rather than clipped."""
    if im.mode.startswith("I;16"):
        im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif im.mode in ("I", "F"):
        lo, hi = cast("tuple[float, float]", im.getextrema())  # single-band modes give (min, max)
        # Guess the range the values were meant in (0..1, 8-bit, 16-bit); otherwise stretch what is there.
        top = next((t for t in (1.0, 255.0, 65535.0) if lo >= 0 and hi <= t), None)
        offset, scale = (0.0, 255 / top) if top else (-lo, 255 / (hi - lo or 1.0))
        im = im.convert("F").point(lambda v: (v + offset) * scale).convert("L")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _rendered(page_number: int, image: Image.Image) -> RenderedPage:
    histogram = image.convert("L").histogram()
    ink = sum(histogram[:_INK_LEVEL])
    blank = ink < _BLANK_INK_FRACTION * image.width * image.height
    return RenderedPage(page_number=page_number, image=image, width_px=image.width, height_px=image.height, blank=blank)
