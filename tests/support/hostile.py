"""Hostile and edge-case documents, generated in code (no binary fixtures), each small to build and send."""

from __future__ import annotations

import io
import struct
import zlib

import pymupdf
from PIL import Image, ImageDraw

_A4 = (595, 842)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (width, height), "white")
    ImageDraw.Draw(image).text((10, 10), "Hostile suite 42", fill="black")
    return image


def image_bytes(fmt: str, width: int, height: int, **params: object) -> bytes:
    """A small drawing saved by Pillow as PNG, JPEG, TIFF or WEBP."""
    out = io.BytesIO()
    _picture(width, height, "L" if fmt == "TIFF" else "RGB").save(out, format=fmt, **params)
    return out.getvalue()


def tiff_frames(n: int, width: int = 300, height: int = 200) -> bytes:
    """An n-frame TIFF (each frame a page)."""
    out = io.BytesIO()
    frames = [_picture(width, height, "L") for _ in range(n)]
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return out.getvalue()


def padded_png(total_bytes: int) -> bytes:
    """A valid PNG of exactly `total_bytes` (a tEXt chunk makes up the size), for byte-limit edges."""
    base = image_bytes("PNG", 64, 64)
    iend = base.rindex(b"IEND") - 4
    pad = total_bytes - len(base) - 12 - len(b"pad\x00")
    assert pad >= 0, f"{total_bytes} B is below a minimal PNG"
    return base[:iend] + _chunk(b"tEXt", b"pad\x00" + b"x" * pad) + base[iend:]


def deflate_repeated(block: bytes, times: int) -> bytes:
    """A valid zlib stream of `block` repeated `times` times, built in the time it takes to deflate `block`
    once: a full flush makes the compressed block independent, so it can be repeated; the checksum covers
    every repetition."""
    comp = zlib.compressobj(6)
    packed = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    header, packed = packed[:2], packed[2:]
    adler = 1
    for _ in range(times):
        adler = zlib.adler32(block, adler)
    return header + packed * times + b"\x03\x00" + struct.pack(">I", adler)  # an empty final block


def gray_png_bomb(side: int = 30000) -> bytes:
    """A valid 8-bit greyscale `side` x `side` PNG, all white: about 0.9 MB for 30000 (0.9 GB decoded)."""
    assert side % 1000 == 0
    idat = deflate_repeated((b"\x00" + b"\xff" * side) * 1000, side // 1000)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_bomb_header(width: int = 30000, height: int = 30000) -> bytes:
    """A small JPEG whose frame header claims `width` x `height` (the scan data is for 64 x 64)."""
    data = bytearray(image_bytes("JPEG", 64, 64))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _pdf_page(draw: bytes, resources: str = "<<>>", *, objects: dict[str, tuple[str, bytes]] | None = None) -> bytes:
    """A one-page A4 PDF whose content stream is `draw`; `objects` maps a placeholder in `resources` to
    (dictionary, stream) of an extra stream object."""
    doc = pymupdf.open()
    page = doc.new_page(width=_A4[0], height=_A4[1])
    for placeholder, (dictionary, stream) in (objects or {}).items():
        xref = doc.get_new_xref()
        doc.update_object(xref, dictionary)
        doc.update_stream(xref, stream)
        resources = resources.replace(placeholder, f"{xref} 0 R")
    contents = doc.get_new_xref()
    doc.update_object(contents, "<<>>")
    doc.update_stream(contents, draw)
    doc.xref_set_key(page.xref, "Resources", resources)
    doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    data: bytes = doc.tobytes(garbage=1, deflate=True)
    doc.close()
    return data


def inline_image_pdf(width: int, height: int) -> bytes:
    """A page drawing a white `width` x `height` greyscale inline image (BI ... ID ... EI), Flate-compressed:
    a 30000 x 30000 one is a few KB of PDF and 0.9 GB once MuPDF decodes it."""
    assert height % 1000 == 0 or height < 1000
    rows = min(1000, height)
    data = deflate_repeated(b"\xff" * width * rows, height // rows)
    draw = b"q 595 0 0 842 0 0 cm BI /W %d /H %d /CS /G /BPC 8 /F /Fl ID " % (width, height) + data + b"\nEI Q"
    return _pdf_page(draw)


def pattern_inline_image_pdf(side: int = 30000) -> bytes:
    """A page filled with a tiling pattern whose cell draws a `side` x `side` inline image: the image hides
    in a pattern, where no cheap check looks, and MuPDF allocates it whole (0.9 GB for 30000)."""
    assert side % 1000 == 0
    data = deflate_repeated(b"\xff" * side * 1000, side // 1000)
    cell = b"q 100 0 0 100 0 0 cm BI /W %d /H %d /CS /G /BPC 8 /F /Fl ID " % (side, side) + data + b"\nEI Q"
    pattern = (
        "<</Type/Pattern/PatternType 1/PaintType 1/TilingType 1/BBox[0 0 100 100]/XStep 100/YStep 100/Resources<<>>>>"
    )
    return _pdf_page(
        b"/Pattern cs /P0 scn 0 0 595 842 re f", "<</Pattern<</P0 PAT>>>>", objects={"PAT": (pattern, cell)}
    )


def xobject_image_pdf(width: int, height: int) -> bytes:
    """A page drawing a `width` x `height` greyscale image XObject."""
    data = b"\xff" * (width * height)  # update_stream deflates it and sets the filter
    image = f"<</Type/XObject/Subtype/Image/Width {width}/Height {height}/ColorSpace/DeviceGray/BitsPerComponent 8>>"
    return _pdf_page(b"q 595 0 0 842 0 0 cm /Im0 Do Q", "<</XObject<</Im0 IMG>>>>", objects={"IMG": (image, data)})


def fanout_pdf(depth: int, *, pages_before: int = 0, pages_after: int = 0) -> bytes:
    """Form XObjects nested `depth` deep, each drawing the next twice: 2**depth draws of one rectangle from a
    file of a few KB. Measured with MuPDF 1.28 on this code: time and memory double per level (depth 19:
    10 s, +110 MB; depth 22: about 80 s and 1 GB), so depth 25 needs about 8 GB and ten minutes.
    Ordinary text pages may come before and after it."""
    doc = pymupdf.open()
    for i in range(pages_before):
        doc.new_page(width=_A4[0], height=_A4[1]).insert_text((72, 72), f"Page {i + 1}", fontsize=20)
    page = doc.new_page(width=200, height=200)
    previous = None
    for _ in range(depth + 1):
        xref = doc.get_new_xref()
        if previous is None:
            content, resources = b"0 0 1 rg 10 10 50 50 re f", "<<>>"
        else:
            content, resources = (
                b"q 0.9 0 0 0.9 1 1 cm /X Do Q q 0.9 0 0 0.9 2 2 cm /X Do Q",
                f"<</XObject<</X {previous} 0 R>>>>",
            )
        doc.update_object(xref, f"<</Type/XObject/Subtype/Form/BBox[0 0 200 200]/Resources {resources}>>")
        doc.update_stream(xref, content)
        previous = xref
    contents = doc.get_new_xref()
    doc.update_object(contents, "<<>>")
    doc.update_stream(contents, b"/X Do")
    doc.xref_set_key(page.xref, "Resources", f"<</XObject<</X {previous} 0 R>>>>")
    doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    for i in range(pages_after):
        doc.new_page(width=_A4[0], height=_A4[1]).insert_text((72, 72), f"After {i + 1}", fontsize=20)
    data: bytes = doc.tobytes(garbage=1, deflate=True)
    doc.close()
    return data


def content_bomb_pdf(decompressed_bytes: int) -> bytes:
    """A page whose content stream inflates from about 1/1000 of `decompressed_bytes` to that many bytes of
    spaces (a Flate bomb in the content itself)."""
    body = deflate_repeated(b" " * (1 << 20), decompressed_bytes >> 20)
    doc = pymupdf.open()
    page = doc.new_page(width=_A4[0], height=_A4[1])
    contents = doc.get_new_xref()
    doc.update_object(contents, f"<</Filter/FlateDecode/Length {len(body)}>>")
    doc.update_stream(contents, body, compress=False)
    doc.xref_set_key(contents, "Filter", "/FlateDecode")
    doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    data: bytes = doc.tobytes(garbage=0, deflate=False)
    doc.close()
    return data


def pdf_with_image(image: bytes) -> bytes:
    """A page showing `image` (inserted as is: a truncated JPEG stays truncated inside the PDF)."""
    doc = pymupdf.open()
    page = doc.new_page(width=_A4[0], height=_A4[1])
    page.insert_image(page.rect, stream=image)
    data: bytes = doc.tobytes()
    doc.close()
    return data


def truncated_flate_image_pdf() -> bytes:
    """A page whose Flate image stream is cut in half (the PDF itself is whole)."""
    doc = pymupdf.open(stream=pdf_with_image(image_bytes("PNG", 400, 400)), filetype="pdf")
    xref = doc[0].get_images()[0][0]
    raw = doc.xref_stream_raw(xref)
    doc.update_stream(xref, raw[: len(raw) // 2], compress=False)
    data: bytes = doc.tobytes()
    doc.close()
    return data


def javascript_pdf() -> bytes:
    """A text page with a JavaScript OpenAction and a Launch action (never run: we only render)."""
    doc = pymupdf.open()
    page = doc.new_page(width=_A4[0], height=_A4[1])
    page.insert_text((72, 100), "Scripted", fontsize=20)
    js = doc.get_new_xref()
    doc.update_object(js, "<</S/JavaScript/JS(app.alert('hi'))/Next<</S/Launch/F(calc.exe)>>>>")
    doc.xref_set_key(doc.pdf_catalog(), "OpenAction", f"{js} 0 R")
    data: bytes = doc.tobytes()
    doc.close()
    return data
