"""The CPU engine: the `tesseract` binary run as a subprocess per page, its TSV output turned into markdown.

Each page is one `tesseract stdin stdout -l LANGS --psm N tsv` call (PNG on stdin), so pages run in parallel
on a small thread pool and a crash or timeout fails only its own page. Words come back with boxes and a
confidence; tesseract_tsv rebuilds the text in tesseract's reading order (paragraphs separated by a blank line,
lines by a newline) and turns runs of lines whose words fall into the same columns into markdown pipe tables.

A page that names no language (and an engine configured without default languages) is detected first: a cheap
`eng` pass over two sampled text bands (detect.sample_bands) whose text py3langid classifies; when that sample
reads badly (few words or low confidence), or the page is landscape, Tesseract OSD (`--psm 0`) says which way
up the page is and it is turned before sampling again. Pages with explicit languages are turned only when
their own recognition reads badly (or they are landscape) and OSD then finds them rotated.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocrbooth.errors import ConfigError, PoisonError
from ocrbooth.models.ocr.confidence import summarize
from ocrbooth.models.ocr.detect import LanguageIdentifier, Orientation, parse_osd, sample_bands, upright
from ocrbooth.models.ocr.engine import PageInput, PageOutput, Rotation, StepStats
from ocrbooth.models.ocr.tesseract_tsv import Line, layout, parse_tsv
from ocrbooth.models.ocr.worker import PoolWorker

if TYPE_CHECKING:
    from PIL.Image import Image

SUPPORTED_LANGUAGES: tuple[str, ...] = ("eng", "fra", "deu", "spa", "ita", "nld", "por", "swe", "dan")
"""ISO 639-2 codes we accept; each is also tesseract's traineddata name and Debian's `tesseract-ocr-<code>`."""

DEFAULT_LANGUAGES: tuple[str, ...] = ("eng",)
"""What a page is read with when detection finds too little text to tell (and what the sample pass reads with)."""

OSD_LANGUAGE = "osd"  # tesseract's orientation-and-script model (Debian: tesseract-ocr-osd)
_READS_BADLY = 0.60  # mean word confidence below which a page may be turned: ask OSD
_MIN_SAMPLE_WORDS = 8  # a sample with fewer words may be sideways text: ask OSD
_MIN_OSD_CONFIDENCE = 2.0  # below this OSD's angle is a guess; the page is left as it is


def validate_languages(codes: Iterable[str]) -> tuple[str, ...]:
    """Normalise request language codes (lower case, duplicates dropped, order kept); raise
    PoisonError(code="unsupported_language") for any code outside SUPPORTED_LANGUAGES. Call before any work."""
    seen: list[str] = []
    unknown: list[str] = []
    for raw in codes:
        code = raw.strip().lower()
        if code not in SUPPORTED_LANGUAGES:
            unknown.append(raw)
        elif code not in seen:
            seen.append(code)
    if unknown:
        raise PoisonError(
            f"unsupported language code(s) {unknown!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}",
            code="unsupported_language",
        )
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class Detection:
    """What detection made of a page that named no language."""

    image: Image
    """The page, upright."""
    rotate_deg: Rotation
    """Clockwise rotation applied to make it upright."""
    languages: tuple[str, ...]
    """Languages to read it with; empty when the sample held too little text to tell."""


class TesseractEngine:
    """OcrEngine on the `tesseract` binary (CPU). No Python bindings: one subprocess per page."""

    name = "tesseract"

    def __init__(
        self,
        *,
        default_languages: Sequence[str] = (),
        required_languages: Sequence[str] = SUPPORTED_LANGUAGES,
        psm: int = 3,
        timeout_s: float = 120.0,
        max_workers: int = 2,
        binary: str = "tesseract",
    ) -> None:
        """`default_languages` serve pages that name none; empty means detect each such page's language and
        orientation. `load()` checks that those and `required_languages` are installed. `psm` is tesseract's
        page segmentation mode (3: automatic)."""
        try:
            self.default_languages = validate_languages(default_languages)
            self.required_languages = validate_languages(required_languages)
        except PoisonError as exc:
            raise ConfigError(f"tesseract engine: {exc}") from exc
        self.model: str | None = None
        self.psm = psm
        self.timeout_s = timeout_s
        self.max_workers = max(1, max_workers)
        self.binary = binary
        self.identifier = LanguageIdentifier(self.required_languages or SUPPORTED_LANGUAGES)
        # tesseract's OpenMP threads would oversubscribe the cores our own thread pool already fills.
        self._env = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    def load(self) -> None:
        """Check the binary runs and every default/required language pack is installed; ConfigError if not."""
        path = shutil.which(self.binary)
        if path is None:
            raise ConfigError(
                f"tesseract binary {self.binary!r} not found on PATH; install the Debian package tesseract-ocr "
                "(scripts/install-system-deps.sh)"
            )
        version = self._run_info("--version")
        self.model = next((line.strip() for line in version.splitlines() if line.strip()), "tesseract")
        listed = self._run_info("--list-langs").splitlines()[1:]  # first line names the tessdata folder
        installed = {line.strip() for line in listed}
        # OSD serves every engine: pages with explicit languages are turned upright too when they read badly.
        wanted = dict.fromkeys((*self.default_languages, *self.required_languages, *DEFAULT_LANGUAGES, OSD_LANGUAGE))
        missing = [code for code in wanted if code not in installed]
        if missing:
            packages = " ".join(f"tesseract-ocr-{code}" for code in missing)
            raise ConfigError(
                f"tesseract language data missing for {', '.join(missing)}; install the Debian packages: "
                f"apt-get install {packages} (scripts/install-system-deps.sh)"
            )
        if not self.default_languages:
            self.identifier.load()

    def _run_info(self, flag: str) -> str:
        try:
            done = subprocess.run(
                [self.binary, flag], capture_output=True, timeout=30, check=True, env=self._env, text=True
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"tesseract {flag} failed: {exc}") from exc
        # Older builds print --version on stderr.
        return done.stdout or done.stderr

    def cost(self, page: PageInput) -> int:
        """Every page costs one slot: tesseract has no token budget."""
        return 1

    def worker(self, *, span_threshold: float, on_step: Callable[[StepStats], None] | None = None) -> PoolWorker:
        """Pages run as they come, `max_workers` at a time."""
        return PoolWorker(self, span_threshold=span_threshold, threads=self.max_workers, on_step=on_step)

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise pages in parallel (one subprocess each); a failing page gets finish_reason="error"."""
        if len(pages) <= 1 or self.max_workers == 1:
            return [self._recognize_one(page, span_threshold) for page in pages]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pages)), thread_name_prefix="tesseract") as pool:
            return list(pool.map(lambda page: self._recognize_one(page, span_threshold), pages))

    def detect(self, image: Image, *, deadline: float | None = None) -> Detection:
        """Orientation and languages of a page that names none (see the module docstring). `deadline`
        (time.monotonic()) bounds all its tesseract runs together; past it they raise TimeoutExpired."""
        words = self._sample(image, deadline)
        rotate: Rotation = 0
        # Tesseract reads a sideways page's vertical lines well enough to pass the sample check, so a landscape
        # page (what a portrait page scanned sideways becomes) always asks OSD.
        if image.width > image.height or _reads_badly(words, _MIN_SAMPLE_WORDS):
            orientation = self._orientation(image, deadline)
            if orientation is not None:
                rotate = orientation.rotate_deg
                image = upright(image, rotate)
                words = self._sample(image, deadline)
        text = "\n".join(" ".join(word.text for word in line.words) for line in words)
        return Detection(image=image, rotate_deg=rotate, languages=self.identifier.choose(text))

    def _sample(self, image: Image, deadline: float | None) -> list[Line]:
        return parse_tsv(self._run_tesseract(sample_bands(image), DEFAULT_LANGUAGES, deadline=deadline))

    def _orientation(self, image: Image, deadline: float | None) -> Orientation | None:
        """OSD's rotation when it is confident the page is not upright; None otherwise (or when OSD fails)."""
        try:
            osd = parse_osd(self._run_tesseract(image, (OSD_LANGUAGE,), psm=0, output=(), deadline=deadline))
        except subprocess.TimeoutExpired:
            raise
        except subprocess.SubprocessError:  # "too few characters" and the like: leave the page as it is
            return None
        if osd is None or osd.rotate_deg == 0 or osd.confidence < _MIN_OSD_CONFIDENCE:
            return None
        return osd

    def _recognize_one(self, page: PageInput, span_threshold: float) -> PageOutput:
        languages = page.languages or self.default_languages
        image = page.image
        rotate: Rotation = 0
        detection: Detection | None = None
        deadline = time.monotonic() + self.timeout_s  # one bound for every tesseract run of the page
        try:
            if not languages:
                detection = self.detect(image, deadline=deadline)  # asks OSD itself when the page needs it
                image, rotate = detection.image, detection.rotate_deg
                languages = detection.languages or DEFAULT_LANGUAGES
            lines = parse_tsv(self._run_tesseract(image, languages, deadline=deadline))
            if detection is None and (image.width > image.height or _reads_badly(lines, 1)):
                orientation = self._orientation(image, deadline)
                if orientation is not None:
                    turned_image = upright(image, orientation.rotate_deg)
                    turned = parse_tsv(self._run_tesseract(turned_image, languages, deadline=deadline))
                    if _mean_probability(turned) > _mean_probability(lines):
                        lines, rotate = turned, orientation.rotate_deg
        except subprocess.TimeoutExpired:
            return _failed(f"tesseract timed out after {self.timeout_s:g} s")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return _failed(str(exc))
        builder = layout(lines)
        text = builder.text()
        confidence, minimum, spans = summarize(builder.probs, builder.spans, threshold=span_threshold)
        return PageOutput(
            text=text,
            finish_reason="stop",
            confidence=confidence,
            min_token_confidence=minimum,
            low_confidence_spans=spans,
            token_count=len(builder.probs),
            languages=detection.languages if detection else (),
            rotation_deg=rotate,
        )

    def _run_tesseract(
        self,
        image: Image,
        languages: Sequence[str],
        *,
        psm: int | None = None,
        output: Sequence[str] = ("tsv",),
        deadline: float | None = None,
    ) -> str:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # speed over size: it only crosses a pipe
        mode = self.psm if psm is None else psm
        argv = [self.binary, "stdin", "stdout", "-l", "+".join(languages), "--psm", str(mode), *output]
        timeout = self.timeout_s if deadline is None else max(deadline - time.monotonic(), 0.001)
        done = subprocess.run(argv, input=buffer.getvalue(), capture_output=True, timeout=timeout, env=self._env)
        if done.returncode != 0:
            stderr = done.stderr.decode("utf-8", "replace").strip()[-500:]
            raise subprocess.SubprocessError(f"tesseract exited with {done.returncode}: {stderr}")
        return done.stdout.decode("utf-8", "replace")


def _mean_probability(lines: Sequence[Line]) -> float:
    probs = [word.probability for line in lines for word in line.words if word.probability is not None]
    return sum(probs) / len(probs) if probs else 0.0


def _reads_badly(lines: Sequence[Line], min_words: int) -> bool:
    """Too few words, or words read with low confidence: what upside-down or sideways text looks like."""
    words = sum(len(line.words) for line in lines)
    return words < min_words or _mean_probability(lines) < _READS_BADLY


def _failed(message: str) -> PageOutput:
    return PageOutput(text="", finish_reason="error", error_code="ocr_failed", error_message=message)
