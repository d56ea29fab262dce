"""CPU OCR without a language hint: character error rate per language, and what detection costs.

The corpus (ocrbooth/testing/corpus.json) is pages of the Debian Reference in six languages, fetched from
Debian's archive (`apt-get download`, pinned version and SHA-256), each rendered as a 150-dpi grayscale scan with
the PDF's text layer as ground truth, plus one page per language scanned turned by 90, 180 or 270 degrees.
Every page is read by the Tesseract engine three ways, one page at a time on one core:

- hint: the page's true language, as a request naming it would;
- detect: no language named: `engine.detect()` (a sampled `eng` pass + py3langid, and Tesseract OSD when the
  sample reads badly), then recognition with the detected languages: exactly what the engine does per page;
- all9: all nine installed languages at once, the other way to need no hint; it costs several times a
  one-language reading, so only the first `--all9-pages` upright pages of each language get it.

CER uses ocrbooth.testing.cer (NFC, quotes, line-end hyphenation, whitespace; see its docstring) and is
summed over pages (total edits / total reference characters). Times are CPU seconds of tesseract and of this
process (less sensitive than wall time to other work on the machine), with wall seconds alongside.

Usage:  PYTHONPATH=. python bench/ocr_languages.py [--limit N] [--out bench/results/ocr_languages.json]
Plot:   PYTHONPATH=. python bench/ocr_languages.py --plot-only bench/results/ocr_languages.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from ocrbooth.models.ocr.engine import PageInput, PageOutput
from ocrbooth.models.ocr.tesseract import DEFAULT_LANGUAGES, SUPPORTED_LANGUAGES, TesseractEngine
from ocrbooth.testing import corpus
from ocrbooth.testing.cer import edits

T = TypeVar("T")
MODES = ("hint", "detect", "all9")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ocr_languages.json"))
    parser.add_argument("--cache", type=Path, default=corpus.DEFAULT_CACHE, help="where fetched PDFs are kept")
    parser.add_argument("--limit", type=int, help="upright pages per language (default: all of the manifest)")
    parser.add_argument("--all9-pages", type=int, default=2, help="upright pages per language also read with all 9")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="only draw the PNG for an existing result")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return 0
    try:
        corpus.fetch(args.cache)
    except corpus.CorpusUnavailable as exc:
        print(f"ocr_languages: {exc}", file=sys.stderr)
        return 1
    engine = TesseractEngine(max_workers=1)
    engine.load()
    seen: dict[str, int] = {}
    rows = []
    for page in corpus.pages(args.cache, limit=args.limit):
        all9 = page.rotation_deg == 0 and seen.get(page.language, 0) < args.all9_pages
        seen[page.language] = seen.get(page.language, 0) + all9
        rows.append(measure(engine, page, all9=all9))
    result = {
        "benchmark": "ocr_languages",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(engine),
        "settings": {
            "limit": args.limit,
            "all9_pages": args.all9_pages,
            "corpus": str(corpus.MANIFEST.name),
            "psm": engine.psm,
        },
        "summary": summarize(rows),
        "pages": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print_table(result["summary"])
    return 0


def machine(engine: TesseractEngine) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tesseract": engine.model,
        "py3langid": version("py3langid"),
        "tessdata": [*sorted(SUPPORTED_LANGUAGES), "osd"],
    }


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """fn's result, CPU seconds, wall seconds."""
    cpu, wall = _cpu(), time.perf_counter()
    value = fn()
    return value, _cpu() - cpu, time.perf_counter() - wall


def measure(engine: TesseractEngine, page: corpus.CorpusPage, *, all9: bool) -> dict[str, Any]:
    def read(image: Any, languages: tuple[str, ...]) -> PageOutput:
        (out,) = engine.recognize([PageInput(image, languages=languages)], span_threshold=0.5)
        if out.finish_reason != "stop":
            raise RuntimeError(f"{page.source}: {out.error_message}")
        return out

    row: dict[str, Any] = {
        "language": page.language,
        "source": page.source,
        "rotation_deg": page.rotation_deg,
    }
    hint, cpu, wall = timed(lambda: read(page.image, (page.language,)))
    row["hint"] = _scored(page, hint, cpu, wall)
    row["hint"]["rotation_applied"] = hint.rotation_deg
    detection, d_cpu, d_wall = timed(lambda: engine.detect(page.image))
    found = detection.languages or DEFAULT_LANGUAGES
    detected, cpu, wall = timed(lambda: read(detection.image, found))
    row["detect"] = _scored(page, detected, cpu, wall)
    row["detect"].update(
        languages=list(detection.languages),
        rotation_applied=detection.rotate_deg,
        detect_cpu_s=round(d_cpu, 3),
        detect_wall_s=round(d_wall, 3),
    )
    if all9:
        nine, cpu, wall = timed(lambda: read(page.image, SUPPORTED_LANGUAGES))
        row["all9"] = _scored(page, nine, cpu, wall)
    print(
        f"{page.language} {page.source.rsplit('#', 1)[1]:>4} rot {page.rotation_deg:>3}: "
        + "  ".join(f"{m} {row[m]['cer']:.2%}" for m in MODES if m in row)
        + f"  detected {'+'.join(detection.languages) or '-'} turned {detection.rotate_deg}"
        + f"  detect {d_cpu:.2f}s / recognise {row['detect']['cpu_s']:.2f}s CPU",
        flush=True,
    )
    return row


def _scored(page: corpus.CorpusPage, out: PageOutput, cpu: float, wall: float) -> dict[str, Any]:
    distance, length = edits(page.reference, out.text)
    return {
        "edits": distance,
        "chars": length,
        "cer": distance / length,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def cer(selected: list[dict[str, Any]], mode: str) -> float | None:
        scored = [row[mode] for row in selected if mode in row]
        chars = sum(s["chars"] for s in scored)
        return sum(s["edits"] for s in scored) / chars if chars else None

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    upright = [row for row in rows if row["rotation_deg"] == 0]
    rotated = [row for row in rows if row["rotation_deg"] != 0]
    languages = sorted({row["language"] for row in rows}, key=SUPPORTED_LANGUAGES.index)
    per_language = {}
    for language in languages:
        mine = [row for row in upright if row["language"] == language]
        per_language[language] = {
            "pages": len(mine),
            "chars": sum(row["hint"]["chars"] for row in mine),
            **{f"cer_{mode}": cer(mine, mode) for mode in MODES},
            "detected_right": sum(row["detect"]["languages"][:1] == [language] for row in mine),
            "read_with_second_language": sum(len(row["detect"]["languages"]) > 1 for row in mine),
        }
    twins = [
        (row, next(u for u in upright if u["source"] == row["source"]))
        for row in rotated
        if any(u["source"] == row["source"] for u in upright)
    ]
    return {
        "pages_upright": len(upright),
        "pages_rotated": len(rotated),
        "languages": per_language,
        "overall": {mode: cer(upright, mode) for mode in MODES},
        "all9_pages": {mode: cer([row for row in upright if "all9" in row], mode) for mode in MODES},
        "rotated": {
            "cer_hint": cer(rotated, "hint"),
            "cer_detect": cer(rotated, "detect"),
            "cer_same_pages_upright_detect": cer([u for _, u in twins], "detect"),
            "turned_right": sum(
                (row["detect"]["rotation_applied"] + row["rotation_deg"]) % 360 == 0 for row in rotated
            ),
        },
        "time": {
            "upright_detect_cpu_s": mean([row["detect"]["detect_cpu_s"] for row in upright]),
            "upright_recognise_cpu_s": mean([row["detect"]["cpu_s"] for row in upright]),
            "upright_hint_cpu_s": mean([row["hint"]["cpu_s"] for row in upright]),
            "upright_all9_cpu_s": mean([row["all9"]["cpu_s"] for row in upright if "all9" in row]),
            "rotated_detect_cpu_s": mean([row["detect"]["detect_cpu_s"] for row in rotated]),
            "rotated_recognise_cpu_s": mean([row["detect"]["cpu_s"] for row in rotated]),
            "upright_detect_wall_s": mean([row["detect"]["detect_wall_s"] for row in upright]),
            "upright_recognise_wall_s": mean([row["detect"]["wall_s"] for row in upright]),
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    print(f"\n{'language':<9}{'pages':>6}{'hint':>9}{'detect':>9}{'all9*':>9}{'detected':>10}")
    for language, s in summary["languages"].items():
        print(
            f"{language:<9}{s['pages']:>6}{pct(s['cer_hint']):>9}{pct(s['cer_detect']):>9}{pct(s['cer_all9']):>9}"
            f"{s['detected_right']:>7}/{s['pages']}"
        )
    o = summary["overall"]
    print(f"{'all':<9}{summary['pages_upright']:>6}{pct(o['hint']):>9}{pct(o['detect']):>9}{pct(o['all9']):>9}")
    n = summary["all9_pages"]
    print(
        f"* all9 only on the first pages of each language; on those pages: hint {pct(n['hint'])}, "
        f"detect {pct(n['detect'])}, all9 {pct(n['all9'])}"
    )
    r, t = summary["rotated"], summary["time"]
    print(
        f"rotated ({summary['pages_rotated']}): hint {pct(r['cer_hint'])}, detect {pct(r['cer_detect'])} "
        f"(same pages upright: {pct(r['cer_same_pages_upright_detect'])}), turned right {r['turned_right']}"
    )
    print(
        f"CPU s/page upright: detect {t['upright_detect_cpu_s']:.2f} + recognise {t['upright_recognise_cpu_s']:.2f} "
        f"(ratio {t['upright_detect_cpu_s'] / t['upright_recognise_cpu_s']:.2f}); hint {t['upright_hint_cpu_s']:.2f}; "
        f"all9 {t['upright_all9_cpu_s']:.2f}; rotated: detect {t['rotated_detect_cpu_s']:.2f}"
    )


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    languages = list(summary["languages"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    # all9 ran on a few pages per language only, so it is compared on those pages alone (the last group).
    groups = [(lang, summary["languages"][lang], "cer_") for lang in languages]
    groups += [(f"all\n({summary['pages_upright']} pages)", summary["overall"], "")]
    subset = sum(1 for row in result["pages"] if "all9" in row)
    groups += [(f"all9's\n{subset} pages", summary["all9_pages"], "")]
    width = 0.27
    for index, mode in enumerate(MODES):
        xs = [x for x, (_, values, prefix) in enumerate(groups) if values.get(f"{prefix}{mode}") is not None]
        xs = [x for x in xs if mode != "all9" or x == len(groups) - 1]
        heights = [100 * groups[x][1][f"{groups[x][2]}{mode}"] for x in xs]
        left.bar([x + (index - 1) * width for x in xs], heights, width, label=mode)
    left.axhline(2.0, color="red", linestyle="--", linewidth=1, label="2% target")
    left.set_xticks(range(len(groups)), [name for name, _, _ in groups])
    left.set_ylabel("CER (%)")
    left.set_title(f"CER per language ({summary['pages_upright']} upright pages, 150 dpi)")
    left.legend()
    t = summary["time"]
    bars = {
        "hint": (0.0, t["upright_hint_cpu_s"]),
        "detect\n(upright)": (t["upright_detect_cpu_s"], t["upright_recognise_cpu_s"]),
        "detect\n(rotated)": (t["rotated_detect_cpu_s"], t["rotated_recognise_cpu_s"]),
        "all9": (0.0, t["upright_all9_cpu_s"]),
    }
    names = list(bars)
    right.bar(names, [b[0] for b in bars.values()], label="detection")
    right.bar(names, [b[1] for b in bars.values()], bottom=[b[0] for b in bars.values()], label="recognition")
    right.set_ylabel("CPU seconds per page")
    right.set_title("Cost per page (one core)")
    right.legend()
    fig.suptitle(f"Tesseract without a language hint — {result['machine']['tesseract']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if shutil.which("tesseract") is None:
        print("ocr_languages: tesseract is not installed (scripts/install-system-deps.sh)", file=sys.stderr)
        raise SystemExit(1)
    raise SystemExit(main())
