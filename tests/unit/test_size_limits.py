"""One consistent set of size limits: the defaults agree, and a configuration where they contradict is refused."""

from __future__ import annotations

import pytest

from ocrbooth.config import load_settings
from ocrbooth.errors import ConfigError


def _problems(caught: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line.strip() for line in str(caught.value).splitlines()[1:]]


def test_default_inline_limit_fits_in_a_message_base64_encoded_so_both_checks_can_fire() -> None:
    """With the defaults, the largest inline document, base64-encoded, fits in the input message limit with room
    to spare: an inline document over max_inline_bytes gets source_too_large rather than never being checked."""
    s = load_settings()
    assert s.ocr.max_inline_bytes <= s.max_input_message_bytes * 3 // 4
    assert s.ocr.max_inline_bytes < s.max_input_message_bytes * 3 // 4  # strictly: the inline check is reachable
    assert s.ocr.max_inline_bytes <= s.ocr.max_source_bytes


def test_the_inline_limit_may_reach_exactly_three_quarters_of_the_message_limit() -> None:
    """3 MiB inline in a 4 MiB message is consistent (4/3 of it is exactly 4 MiB)."""
    s = load_settings(max_input_message_bytes=4 * 1024 * 1024, ocr={"max_inline_bytes": 3 * 1024 * 1024})
    assert s.ocr.max_inline_bytes == 3 * 1024 * 1024


def test_an_inline_limit_above_the_message_limit_is_refused_with_every_other_problem() -> None:
    """The issue's configuration (20 MiB inline, 16 MiB messages) fails to load, and the other contradictions
    are reported with it in one error, as every cross-check does."""
    with pytest.raises(ConfigError) as caught:
        load_settings(
            max_input_message_bytes=16 * 1024 * 1024,
            ocr={"max_inline_bytes": 20 * 1024 * 1024, "max_source_bytes": 10 * 1024 * 1024},
            finetune={"min_resolution": 512, "max_resolution": 256},
            retry={"initial_backoff_ms": 5_000, "max_backoff_ms": 1_000},
        )
    problems = _problems(caught)
    assert (
        "ocr.max_inline_bytes: 20971520 is 27962028 bytes in base64, over max_input_message_bytes (16777216): "
        "keep it at most 3/4 of that"
    ) in problems
    assert "ocr.max_inline_bytes: must not exceed ocr.max_source_bytes" in problems
    assert "finetune.min_resolution: must not exceed finetune.max_resolution" in problems
    assert "retry.initial_backoff_ms: must not exceed retry.max_backoff_ms" in problems
    assert len(problems) == 4


def test_one_byte_over_three_quarters_is_refused() -> None:
    """3 MiB + 1 inline needs 4 MiB + 4 bytes of base64: over a 4 MiB message limit."""
    with pytest.raises(ConfigError) as caught:
        load_settings(max_input_message_bytes=4 * 1024 * 1024, ocr={"max_inline_bytes": 3 * 1024 * 1024 + 1})
    assert [p.split(":")[0] for p in _problems(caught)] == ["ocr.max_inline_bytes"]


def test_lowering_the_message_limit_from_the_environment_alone_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator who lowers OCRBOOTH_MAX_INPUT_MESSAGE_BYTES without the inline limit is told which to change."""
    monkeypatch.setenv("OCRBOOTH_MAX_INPUT_MESSAGE_BYTES", "4096")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert any(p.startswith("ocr.max_inline_bytes:") for p in _problems(caught))
    monkeypatch.setenv("OCRBOOTH_OCR_MAX_INLINE_BYTES", "3072")
    assert load_settings().ocr.max_inline_bytes == 3072
