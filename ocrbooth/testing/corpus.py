"""The OCR accuracy corpus: published PDF pages fetched from Debian's archive, rendered like scans.

`corpus.json` pins each document (package, version, the .deb's SHA-256, the PDF's path inside it, page numbers,
licence). `fetch()` brings the PDFs with `apt-get download` (root not needed, Debian's package lists are) and
`dpkg-deb`, checks the digests and caches the PDFs; `pages()` renders each listed page as a 150-dpi grayscale
image, as a flatbed scan would give it, with the page's text layer as ground truth. Run
`python -m ocrbooth.testing.corpus [CACHE_DIR]` to fetch ahead of time.
"""

# mypy: disable-error-code="no-untyped-call"
# (PyMuPDF ships no annotations for `Document` and `Page`.)

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymupdf
from PIL import Image

MANIFEST = Path(__file__).with_name("corpus.json")
DEFAULT_CACHE = Path(".ocrbooth/corpus")


class CorpusUnavailable(RuntimeError):
    """The corpus cannot be fetched here; the message says what to do."""


@dataclass(frozen=True, slots=True)
class SourcePdf:
    """One pinned PDF of the manifest."""

    language: str
    package: str
    version: str
    sha256: str
    path: str
    pages: tuple[int, ...]
    rotated: dict[int, int]
    """Page number -> clockwise degrees the page is also scanned at."""

    @property
    def filename(self) -> str:
        return f"{self.package}_{self.version}.pdf"


@dataclass(frozen=True, slots=True)
class CorpusPage:
    """One rendered page with its ground truth."""

    language: str
    source: str
    """`package version path#page`."""
    page_number: int
    rotation_deg: int
    """How far the scan is turned clockwise (0: upright)."""
    image: Image.Image
    reference: str


def documents(manifest: Path = MANIFEST) -> list[SourcePdf]:
    """The manifest's documents."""
    raw: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    return [
        SourcePdf(
            language=doc["language"],
            package=doc["package"],
            version=doc["version"],
            sha256=doc["sha256"],
            path=doc["path"],
            pages=tuple(doc["pages"]),
            rotated={int(page): int(deg) for page, deg in doc.get("rotated", {}).items()},
        )
        for doc in raw["documents"]
    ]


def fetch(cache: Path = DEFAULT_CACHE, manifest: Path = MANIFEST) -> dict[str, Path]:
    """Each document's PDF in `cache` (fetched and verified on first use), by package name."""
    cache.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for doc in documents(manifest):
        target = cache / doc.filename
        if not target.exists():
            _fetch_one(doc, target)
        found[doc.package] = target
    return found


def _fetch_one(doc: SourcePdf, target: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable(f"{doc.package}: apt-get and dpkg-deb are needed to fetch the corpus (Debian)")
    with tempfile.TemporaryDirectory(prefix="ocrbooth-corpus-") as tmp:
        spec = f"{doc.package}={doc.version}"
        done = subprocess.run(
            ["apt-get", "download", "-q", spec], cwd=tmp, capture_output=True, text=True, timeout=600, check=False
        )
        debs = list(Path(tmp).glob(f"{doc.package}_*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise CorpusUnavailable(
                f"apt-get download {spec} failed ({done.stderr.strip()[-300:]}); run `apt-get update` first"
            )
        digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if digest != doc.sha256:
            raise CorpusUnavailable(f"{debs[0].name}: SHA-256 {digest} is not the manifest's {doc.sha256}")
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(debs[0])], capture_output=True, timeout=120, check=True)
        partial = target.with_suffix(".partial")
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
            member = archive.extractfile(f"./{doc.path}")
            if member is None:
                raise CorpusUnavailable(f"{debs[0].name} has no {doc.path}")
            partial.write_bytes(member.read())
        partial.replace(target)  # a cache file is complete or absent


def render(pdf: pymupdf.Document, page_number: int, dpi: int = 150, rotation_deg: int = 0) -> Image.Image:
    """Page `page_number` (1-based) as an 8-bit grayscale image at `dpi`, turned `rotation_deg` clockwise."""
    pix = pdf[page_number - 1].get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
    image = Image.frombytes("L", (pix.width, pix.height), pix.samples)
    return image.rotate(-rotation_deg, expand=True, fillcolor=255) if rotation_deg else image


def pages(cache: Path = DEFAULT_CACHE, manifest: Path = MANIFEST, *, limit: int | None = None) -> Iterator[CorpusPage]:
    """Every manifest page upright, then the rotated scans; at most `limit` upright pages per language."""
    docs = documents(manifest)
    paths = fetch(cache, manifest)
    dpi = int(json.loads(manifest.read_text(encoding="utf-8")).get("dpi", 150))
    rotated: list[tuple[SourcePdf, int, int]] = []
    for doc in docs:
        with pymupdf.open(stream=paths[doc.package].read_bytes(), filetype="pdf") as pdf:
            for page_number in doc.pages[:limit]:
                yield _page(pdf, doc, page_number, dpi, 0)
            rotated += [(doc, number, deg) for number, deg in doc.rotated.items()]
    for doc, number, deg in rotated:
        with pymupdf.open(stream=paths[doc.package].read_bytes(), filetype="pdf") as pdf:
            yield _page(pdf, doc, number, dpi, deg)


def _page(pdf: pymupdf.Document, doc: SourcePdf, page_number: int, dpi: int, rotation_deg: int) -> CorpusPage:
    return CorpusPage(
        language=doc.language,
        source=f"{doc.package} {doc.version} {doc.path}#{page_number}",
        page_number=page_number,
        rotation_deg=rotation_deg,
        image=render(pdf, page_number, dpi, rotation_deg),
        reference=_text(pdf[page_number - 1]),
    )


def main(argv: list[str]) -> int:
    """Fetch the corpus into the given cache folder (default .ocrbooth/corpus); one line on failure."""
    cache = Path(argv[0]) if argv else DEFAULT_CACHE
    try:
        paths = fetch(cache)
    except (CorpusUnavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"corpus: {exc}", file=sys.stderr)
        return 1
    print(f"corpus: {len(paths)} documents in {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


def _text(page: Any) -> str:
    """The page's text layer in content order (PyMuPDF's `get_text()` is untyped)."""
    return str(page.get_text("text"))
