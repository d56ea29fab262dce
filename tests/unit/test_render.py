"""render: bytes decide the format, pages come out bounded for the model, and every hostile input gets its code."""

# PyMuPDF ships py.typed but leaves most of its functions unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import pymupdf
import pytest
from PIL import Image

from ocrbooth.errors import PoisonError
from ocrbooth.models.ocr.render import (
    RenderLimits,
    page_count,
    render_document,
    render_page,
    resolve_pages,
    sniff_format,
)
from ocrbooth.testing import samples

A4 = (595.0, 842.0)  # points
A6 = (297.6, 419.5)
DEFAULTS = RenderLimits()


@pytest.fixture(scope="module")
def six_hundred_pages() -> bytes:
    """The 600-page hostile PDF, built once for the module."""
    return samples.many_pages_pdf(600)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def _pdf(*sizes: tuple[float, float], text: str = "Hello") -> bytes:
    doc = pymupdf.open()
    for width, height in sizes:
        doc.new_page(width=width, height=height).insert_text((20, 40), text, fontsize=12)
    data: bytes = doc.tobytes()
    doc.close()
    return data


def _tiff_frames() -> bytes:
    frames = [Image.new("RGB", (400, 300), colour) for colour in ("white", "black", "red")]
    return _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def _poison(data: bytes, pages: Sequence[int] | None = None, limits: RenderLimits = DEFAULTS) -> PoisonError:
    with pytest.raises(PoisonError) as caught:
        render_document(data, pages=pages, limits=limits)
    return caught.value


FORMATS: dict[str, Callable[[], bytes]] = {
    "pdf": lambda: samples.text_pdf(["A short paragraph."]),
    "png": lambda: _encode(Image.new("RGB", (640, 480), "white"), "PNG"),
    "jpeg": lambda: _encode(Image.new("RGB", (640, 480), "white"), "JPEG"),
    "tiff": _tiff_frames,
    "webp": lambda: _encode(Image.new("RGB", (640, 480), "white"), "WEBP"),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_is_sniffed_from_its_bytes_and_renders_to_rgb(fmt: str) -> None:
    """PDF, PNG, JPEG, TIFF and WebP are recognised by magic bytes and every page renders as an RGB image."""
    data = FORMATS[fmt]()
    assert sniff_format(data) == fmt
    pages = render_document(data)
    assert [p.page_number for p in pages] == list(range(1, page_count(data) + 1))
    for page in pages:
        assert page.image.mode == "RGB"
        assert (page.width_px, page.height_px) == page.image.size


def test_every_tiff_frame_is_a_page_in_order() -> None:
    """A three-frame TIFF has three pages, rendered in frame order."""
    data = _tiff_frames()
    assert page_count(data) == 3
    colours = [p.image.getpixel((5, 5)) for p in render_document(data)]
    assert colours == [(255, 255, 255), (0, 0, 0), (255, 0, 0)]


def test_large_pdf_page_renders_with_its_longest_side_at_the_render_size() -> None:
    """An A4 page (portrait or landscape) renders with its longest side exactly 1540 px, aspect kept."""
    portrait, landscape = render_document(_pdf(A4, (A4[1], A4[0])))
    assert (portrait.width_px, portrait.height_px) == (round(A4[0] * 1540 / A4[1]), 1540)
    assert (landscape.width_px, landscape.height_px) == (1540, round(A4[0] * 1540 / A4[1]))


def test_small_pdf_page_is_capped_at_max_dpi() -> None:
    """An A6 page renders at 200 DPI, below the 1540 px bound, rather than being blown up to it."""
    (page,) = render_document(_pdf(A6))
    assert (page.width_px, page.height_px) == (round(A6[0] / 72 * 200), round(A6[1] / 72 * 200))
    assert max(page.width_px, page.height_px) < 1540


def test_large_image_is_downscaled_and_small_image_is_not_upscaled() -> None:
    """A 4000x3000 PNG comes out 1540x1155; an 800x600 one keeps its size."""
    (large,) = render_document(_encode(Image.new("RGB", (4000, 3000), "white"), "PNG"))
    (small,) = render_document(_encode(Image.new("RGB", (800, 600), "white"), "PNG"))
    assert large.image.size == (1540, 1155)
    assert small.image.size == (800, 600)


def test_large_jpeg_is_downscaled_to_exactly_the_bound() -> None:
    """A JPEG decoded at reduced scale (libjpeg draft) still ends with its longest side exactly at the bound."""
    (page,) = render_document(_encode(Image.new("L", (3000, 4000), 255), "JPEG"))
    assert page.image.size == (1155, 1540)


def test_jpeg_exif_orientation_is_applied() -> None:
    """A landscape JPEG whose EXIF says "rotate 90°" comes out portrait."""
    image = Image.new("RGB", (400, 200), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    (page,) = render_document(_encode(image, "JPEG", exif=exif))
    assert page.image.size == (200, 400)


def test_transparent_png_renders_on_white() -> None:
    """Fully transparent pixels (stored black) become white paper, and the page is blank."""
    (page,) = render_document(_encode(Image.new("RGBA", (300, 200), (0, 0, 0, 0)), "PNG"))
    assert page.image.getpixel((10, 10)) == (255, 255, 255)
    assert page.blank


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    """A 16-bit grey value of 32896 maps to 8-bit 128 instead of saturating to white."""
    (page,) = render_document(_encode(Image.new("I;16", (100, 100), 32896), "PNG"))
    assert page.image.getpixel((1, 1)) == (128, 128, 128)


def test_pages_selects_sorted_and_deduplicated() -> None:
    """pages=[3, 2, 3] renders pages 2 and 3 once each, in order, identical to those of a full render."""
    data = samples.many_pages_pdf(4)
    everything = render_document(data)
    chosen = render_document(data, pages=[3, 2, 3])
    assert [p.page_number for p in chosen] == [2, 3]
    assert [p.image.tobytes() for p in chosen] == [everything[1].image.tobytes(), everything[2].image.tobytes()]


def test_render_page_matches_render_document() -> None:
    """Rendering page by page (after resolve_pages) gives the same images as rendering the document at once."""
    data = samples.many_pages_pdf(3)
    fmt, numbers = resolve_pages(data, [3, 1])
    assert (fmt, numbers) == ("pdf", [1, 3])
    singles = [render_page(data, fmt, n, DEFAULTS) for n in numbers]
    together = render_document(data, pages=numbers)
    assert [p.image.tobytes() for p in singles] == [p.image.tobytes() for p in together]


HOSTILE: dict[str, tuple[Callable[[], bytes], list[int] | None, str]] = {
    "zero bytes": (samples.empty, None, "unsupported_format"),
    "random garbage": (lambda: b"\x00\x01hello, not a document at all", None, "unsupported_format"),
    "truncated PDF": (samples.truncated_pdf, None, "corrupt_document"),
    "PDF header only": (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 4, None, "corrupt_document"),
    "encrypted PDF": (samples.encrypted_pdf, None, "encrypted_document"),
    "30000x30000 PNG": (samples.huge_png, None, "image_too_large"),
    "PDF embedding a 30000x30000 image": (samples.huge_image_pdf, None, "image_too_large"),
    "page past the end": (lambda: samples.text_pdf(["one page"]), [1, 2], "page_out_of_range"),
    "page zero": (lambda: samples.text_pdf(["one page"]), [0], "page_out_of_range"),
    "truncated PNG": (lambda: FORMATS["png"]()[:200], None, "corrupt_document"),
    "truncated JPEG": (lambda: samples.scanned_jpeg("cut short")[:20_000], None, "corrupt_document"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_rejected_with_its_code(case: str) -> None:
    """Each hostile input raises PoisonError with its own code and a message."""
    build, pages, code = HOSTILE[case]
    error = _poison(build(), pages)
    assert error.code == code
    assert error.message


def test_too_many_pages_is_rejected_before_any_page_renders(
    six_hundred_pages: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 600-page PDF fails with too_many_pages (limit 500) without a single page being rasterised."""

    def no_rendering(*args: object, **kwargs: object) -> None:
        raise AssertionError("a page was rendered")

    monkeypatch.setattr(pymupdf.Page, "get_pixmap", no_rendering)
    assert _poison(six_hundred_pages).code == "too_many_pages"
    assert _poison(six_hundred_pages, pages=[1, 601]).code == "page_out_of_range"


def test_page_limit_counts_the_selected_pages(six_hundred_pages: bytes) -> None:
    """Selecting two pages of the 600-page PDF is within the limit and renders exactly those two."""
    assert page_count(six_hundred_pages) == 600
    pages = render_document(six_hundred_pages, pages=[600, 1])
    assert [p.page_number for p in pages] == [1, 600]


def test_pixel_limit_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's global bomb limit neither warns nor raises; `max_image_pixels` alone decides."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _encode(Image.new("RGB", (200, 100), "white"), "PNG")
    assert render_document(data)[0].image.size == (200, 100)
    assert _poison(data, limits=RenderLimits(max_image_pixels=19_999)).code == "image_too_large"


def test_jpeg_named_pdf_renders_as_a_jpeg() -> None:
    """A JPEG uploaded as scan.pdf is sniffed as JPEG and renders as one page."""
    name, data = samples.jpeg_named_pdf()
    assert name.endswith(".pdf")
    assert sniff_format(data) == "jpeg"
    (page,) = render_document(data)
    assert max(page.image.size) == 1540
    assert not page.blank


def test_blank_pages_are_detected() -> None:
    """Empty PDF pages, white images and a blank noisy scan are blank; a page with one word, or a scan with
    text, is not."""
    empty_pdf = _pdf(A4, text="")
    white_png = _encode(Image.new("RGB", (800, 600), "white"), "PNG")
    assert render_document(empty_pdf)[0].blank
    assert render_document(white_png)[0].blank
    assert render_document(samples.scanned_jpeg("", seed=2))[0].blank
    assert not render_document(samples.many_pages_pdf(1))[0].blank
    assert not render_document(samples.scanned_jpeg("Invoice 42", seed=2))[0].blank


def test_corrupt_pdf_does_not_spam_the_console(capfd: pytest.CaptureFixture[str]) -> None:
    """MuPDF's repair warnings for a broken file stay off stdout and stderr."""
    assert _poison(samples.truncated_pdf()).code == "corrupt_document"
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_render_limits_reject_nonsense() -> None:
    """A zero or negative limit is a configuration error, not a silently empty render."""
    with pytest.raises(ValueError, match="max_pages"):
        RenderLimits(max_pages=0)
