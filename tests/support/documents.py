"""Small documents made for specific assertions."""

from __future__ import annotations

import pymupdf

from ocrbooth.testing import samples


def numbered_pages_pdf(n: int) -> bytes:
    """An n-page PDF whose pages start with "Page N" (large, easy to read) followed by English prose."""
    doc = pymupdf.open()
    for i in range(1, n + 1):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 100), f"Page {i}", fontsize=20)
        page.insert_textbox(pymupdf.Rect(72, 130, 523, 770), samples.LANGUAGE_SAMPLES["eng"], fontsize=12)
    data: bytes = doc.tobytes()
    doc.close()
    return data
