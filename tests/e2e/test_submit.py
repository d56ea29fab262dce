"""`ocrbooth submit` against a daemon process: 50 mixed documents through Kafka and S3."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from ocrbooth.testing import samples
from tests.support.daemon import REPO, DaemonProcess
from tests.support.documents import numbered_pages_pdf
from tests.support.stack import TopicNames

TABLE = [["Item", "Quantity", "Price"], ["Apples", "3", "1.20"], ["Pears", "5", "0.80"], ["Plums", "12", "2.40"]]


def _mixed_documents(directory: Path) -> dict[str, int | None]:
    """Write 50 documents of every supported format; return file name -> expected page count (None: fails)."""
    langs = list(samples.LANGUAGE_SAMPLES)
    scan = Image.open(io.BytesIO(samples.scanned_jpeg("Invoice 42 paid in full", seed=3)))
    expected: dict[str, int | None] = {}

    def put(name: str, data: bytes, pages: int | None) -> None:
        (directory / name).write_bytes(data)
        expected[name] = pages

    for i in range(50):
        kind = i % 10
        if kind in (0, 1, 2):
            lang = langs[i % len(langs)]
            put(f"{i:02d}-{lang}.pdf", samples.text_pdf([samples.LANGUAGE_SAMPLES[lang][:120]]), 1)
        elif kind == 3:
            put(f"{i:02d}-pages.pdf", numbered_pages_pdf(3), 3)
        elif kind == 4:
            put(f"{i:02d}-table.pdf", samples.table_pdf(TABLE), 1)
        elif kind == 5:
            put(f"{i:02d}-scan.jpg", samples.scanned_jpeg(f"Receipt number {i}", seed=i), 1)
        elif kind == 6:
            buf = io.BytesIO()
            scan.convert("L").save(buf, format="PNG")
            put(f"{i:02d}-scan.png", buf.getvalue(), 1)
        elif kind == 7:
            buf = io.BytesIO()
            scan.save(buf, format="TIFF", save_all=True, append_images=[scan.rotate(0)])
            put(f"{i:02d}-scan.tiff", buf.getvalue(), 2)
        elif kind == 8:
            buf = io.BytesIO()
            scan.save(buf, format="WEBP")
            put(f"{i:02d}-scan.webp", buf.getvalue(), 1)
        else:
            put(f"{i:02d}-broken.pdf", samples.truncated_pdf(), None)
    return expected


def _run_submit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ocrbooth.cli", "submit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


async def test_fifty_mixed_documents_all_come_back_in_page_order(
    topics: TopicNames, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """50 mixed documents submitted with `ocrbooth submit` all come back, pages in order, large results
    offloaded to S3 and fetched back by the CLI; the broken ones print their error code."""
    docs = tmp_path / "docs"
    docs.mkdir()
    expected = _mixed_documents(docs)
    env = {
        **daemon_env,
        "OCRBOOTH_HANDLERS": "ocr",
        "OCRBOOTH_OCR_ENGINE": "tesseract",
        "OCRBOOTH_OCR_DEFAULT_LANGUAGES": "eng,fra,deu,spa,ita,nld,por,swe,dan",
        "OCRBOOTH_MAX_MESSAGE_BYTES": "1500",
    }
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        await daemon.wait_ready(120)
        out = tmp_path / "out"
        cli_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        files = [str(docs / name) for name in sorted(expected)]
        proc = await asyncio.to_thread(_run_submit, [*files, "--out", str(out), "--timeout-s", "400"], cli_env)
    finally:
        daemon.kill()
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 1: some documents failed (the broken ones)
    offloaded = 0
    for name, pages in expected.items():
        result = json.loads((out / f"{Path(name).stem}.json").read_text())
        if pages is None:
            assert result["status"] == "failed"
            assert f"{name}: FAILED corrupt_document" in proc.stdout
            continue
        assert result["status"] == "succeeded", result
        assert [p["page_number"] for p in result["pages"]] == list(range(1, pages + 1))
        if name.endswith("-pages.pdf"):
            assert [p["text"].split()[:2] for p in result["pages"]] == [["Page", "1"], ["Page", "2"], ["Page", "3"]]
        if name.endswith("-table.pdf"):
            (table,) = result["pages"][0]["tables"]
            assert table["rows"][0] == TABLE[0]
            assert [row[0] for row in table["rows"]] == [row[0] for row in TABLE]
        assert (out / f"{Path(name).stem}.md").read_text().strip()
        offloaded += result["result_uri"] is not None
    assert offloaded > 0, "no result was large enough to be offloaded; lower OCRBOOTH_MAX_MESSAGE_BYTES"
