"""Malformed Kafka records for every input topic, generated with Hypothesis: a fixed number per kind, the same
ones on every run (`derandomize=True`), so the dead-letter counts the suite reports are reproducible.

Large payloads (1 MiB keys, values over the input limit, 5,000-deep nesting, 20,000-digit numbers) are
built from small drawn parameters: Hypothesis draws at most a few KiB of bytes per example.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

Headers = tuple[tuple[str, bytes | None], ...]

# Codes that say "something went wrong" without saying what: never acceptable for a malformed message.
GENERIC_CODES = frozenset({"handler_error", "retries_exhausted", "crash_loop", "internal_error"})


@dataclass(frozen=True)
class Malformed:
    """One record to produce, the kind of damage it carries, and the codes that may answer it (None: any
    specific code; the daemon picks the name)."""

    kind: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    codes: frozenset[str] | None

    def describe(self) -> str:
        """A short description for failure messages."""
        size = "null" if self.value is None else f"{len(self.value)} B"
        return f"{self.kind} (value {size}: {(self.value or b'')[:60]!r}, key {len(self.key or b'')} B)"


@dataclass(frozen=True)
class Topic:
    """What a topic's messages look like when valid, and how to break each field."""

    name: str
    valid: Mapping[str, Any]
    bad_values: Mapping[str, tuple[Any, ...]]
    """Field -> values that fail the schema (never values pydantic would coerce). A supported-looking but
    unknown schema_version is a kind of its own (`version`): it has its own code."""
    number_fields: tuple[str, ...]
    """Fields where a non-finite or huge number can go."""


_S3 = "s3://ocrbooth/chaos/x.pdf"


def ocr_topic() -> Topic:
    """`ocr.requests`: DocumentRequest."""
    return Topic(
        name="ocr.requests",
        valid={"schema_version": 1, "request_id": "m", "document_id": "d", "source": {"uri": _S3}},
        bad_values={
            "request_id": (None, 5, [], {}, ""),
            "document_id": (None, 7.5, [""], ""),
            "source": (None, _S3, {}, {"uri": "http://example.com/x.pdf"}, {"uri": _S3, "data_base64": "eA=="}),
            "pages": ([0], "1", [-1], {}, []),
            "metadata": ([], {"a": 1}, "x", {"a": None}),
            "options": ({"engine": "gpu"}, {"review_threshold": 2}, [], {"max_new_tokens": 0}),
            "schema_version": ("1", True, None, 1.5),
        },
        number_fields=("options.review_threshold", "options.max_new_tokens", "pages[]", "schema_version"),
    )


def finetune_topic(job_id: str, base_model: str) -> Topic:
    """Valid requests name `job_id` (cancelled before they arrive, so nothing ever trains) and `base_model`."""
    return Topic(
        name="finetune.requests",
        valid={
            "schema_version": 1,
            "job_id": job_id,
            "base_model": base_model,
            "instance_images": ["s3://ocrbooth/chaos/dog.png"],
            "instance_prompt": "a photo of sks dog",
            "with_prior_preservation": False,
        },
        bad_values={
            "job_id": ("../etc", "", None, 5, "a/b", ".hidden"),
            "base_model": ("", None, []),
            "instance_images": ([], ["http://example.com/x.png"], "s3://ocrbooth/x.png", None),
            "instance_prompt": ("", None),
            "resolution": (7, 513, -8, "high"),
            "max_train_steps": (0, "x", 1.5),
            "learning_rate": (0, -1, "fast"),
            "lr_scheduler": ("warp",),
            "mixed_precision": ("fp64",),
            "with_prior_preservation": ("maybe", [], None),
            "schema_version": ("1", True, None, [1]),
        },
        number_fields=("guidance_scale", "learning_rate", "prior_loss_weight", "resolution", "max_train_steps"),
    )


def control_topic(job_id: str) -> Topic:
    """`finetune.control`, read by every replica: valid records cancel `job_id`."""
    return Topic(
        name="finetune.control",
        valid={"schema_version": 1, "job_id": job_id, "action": "cancel"},
        bad_values={
            "job_id": (".x", "", None, 3, "a/b"),
            "action": ("resume", None, "", 1, ["cancel"]),
            "schema_version": ("1", False, {}),
        },
        number_fields=("schema_version", "job_id", "action"),
    )


# ---- building blocks ------------------------------------------------------------------------------------

_present_keys = st.one_of(st.binary(min_size=1, max_size=24), st.text(min_size=1, max_size=12).map(str.encode))
_small_keys = st.one_of(st.none(), _present_keys)


def _set(doc: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with `value` at the dotted path; a last part ending in `[]` makes a one-item list."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if last.endswith("[]"):
        node[last[:-2]] = [value]
    else:
        node[last] = value
    return out


_PLACEHOLDER = "__chaos_raw__"


def _with_raw(doc: Mapping[str, Any], dotted: str, raw: str) -> bytes:
    """`doc` as JSON with the literal text `raw` (not a JSON value, e.g. `NaN` or 5,000 digits) at `dotted`."""
    text = json.dumps(_set(doc, dotted, _PLACEHOLDER))
    return text.replace(json.dumps(_PLACEHOLDER), raw, 1).encode()


def _schema_violation(topic: Topic) -> st.SearchStrategy[bytes]:
    replace = st.sampled_from(sorted(topic.bad_values)).flatmap(
        lambda field: st.sampled_from(topic.bad_values[field]).map(lambda bad: _set(topic.valid, field, bad))
    )
    drop = st.sampled_from(sorted(k for k in topic.valid if k != "schema_version")).map(
        lambda field: {k: v for k, v in topic.valid.items() if k != field}
    )
    extra = (
        st.text(min_size=1, max_size=10)
        .filter(lambda k: k not in topic.valid)
        .map(lambda field: {**topic.valid, field: 1})
    )
    return st.one_of(replace, drop, extra).map(lambda doc: json.dumps(doc).encode())


def _unknown_version(topic: Topic) -> st.SearchStrategy[bytes]:
    versions = st.one_of(st.integers(2, 10**6), st.integers(-(10**6), 0))
    return versions.map(lambda v: json.dumps({**topic.valid, "schema_version": v}).encode())


def _invalid_utf8_values(topic: Topic) -> st.SearchStrategy[bytes]:
    bad = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"])
    base = json.dumps(topic.valid).encode()
    return st.tuples(bad, st.integers(0, len(base))).map(lambda p: base[: p[1]] + p[0] + base[p[1] :])


def _not_json(topic: Topic) -> st.SearchStrategy[bytes]:
    base = json.dumps(topic.valid)
    return (
        st.one_of(
            st.integers(1, len(base) - 1).map(lambda n: base[:n]),  # cut short
            st.text(min_size=1, max_size=40).map(lambda t: "{" + t),
            st.text(min_size=1, max_size=40).map(lambda t: base + "}" + t),  # trailing garbage
            st.sampled_from(["{'single': 'quotes'}", "{job_id: x}", "[1,]", "{,}", "nul", "tru", '"unterminated']),
        )
        .filter(_not_parsable)
        .map(str.encode)
    )


def _not_parsable(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _not_object(topic: Topic) -> st.SearchStrategy[bytes]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=20))
    return st.one_of(scalars, st.lists(scalars, max_size=4), st.just([topic.valid])).map(
        lambda v: json.dumps(v).encode()
    )


def _deep(topic: Topic) -> st.SearchStrategy[bytes]:
    def build(depth: int, shape: str, field: str) -> bytes:
        if shape == "array":
            return b"[" * depth + b"]" * depth
        if shape == "object":
            return b'{"a":' * depth + b"1" + b"}" * depth
        return _with_raw(topic.valid, field, "[" * depth + "]" * depth)  # deep inside a real field

    return st.builds(
        build,
        st.integers(1000, 5000),
        st.sampled_from(["array", "object", "field"]),
        st.sampled_from(sorted(topic.valid)),
    )


def _huge_int(topic: Topic) -> st.SearchStrategy[bytes]:
    def build(digits: int, first: int, field: str, negative: bool) -> bytes:
        return _with_raw(topic.valid, field, ("-" if negative else "") + str(first) + "7" * (digits - 1))

    return st.builds(
        build, st.integers(4301, 20000), st.integers(1, 9), st.sampled_from(topic.number_fields), st.booleans()
    )


def _non_finite(topic: Topic) -> st.SearchStrategy[bytes]:
    tokens = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1E400"])
    return st.builds(
        lambda tok, field: _with_raw(topic.valid, field, tok), tokens, st.sampled_from(topic.number_fields)
    )


def _oversize(topic: Topic, limit: int) -> st.SearchStrategy[bytes]:
    # Valid in every other way: only the size is at fault.
    def build(extra: int, fill: int) -> bytes:
        base = json.dumps({**topic.valid, "pad": ""})
        pad = chr(ord("a") + fill) * (limit - len(base) + extra)
        return json.dumps({**topic.valid, "pad": pad}).encode()

    return st.builds(build, st.integers(1, 100_000), st.integers(0, 25))


def _over_bounds(topic: Topic) -> st.SearchStrategy[bytes]:
    """Valid by the schema, outside the operator's bounds (the daemon's defaults): a failed event, not a dead letter."""
    return st.one_of(
        st.integers(129, 512).map(lambda r: {"resolution": r * 8}),
        st.integers(5001, 10**6).map(lambda n: {"max_train_steps": n}),
        st.integers(17, 512).map(lambda n: {"train_batch_size": n}),
        st.text(min_size=1, max_size=20).map(lambda m: {"base_model": "not-allowed/" + m}),
        st.just({"instance_images": ["s3://some-other-bucket/dog.png"]}),
    ).map(lambda change: json.dumps({**topic.valid, **change}).encode())


def _headers() -> st.SearchStrategy[Headers]:
    header = st.tuples(
        st.text(max_size=16),
        st.one_of(st.none(), st.binary(max_size=64), st.sampled_from([b"\xff\xfe", b"\x00", b"\xed\xa0\x80"])),
    )
    # At least one null or non-UTF-8 value in every record of this kind.
    return st.tuples(
        st.lists(header, max_size=4),
        st.sampled_from([None, b"\xff", b"\xc3\x28"]),
        st.text(max_size=8),
    ).map(lambda p: (*p[0], (p[2], p[1])))


# ---- the catalogue --------------------------------------------------------------------------------------

Build = Callable[[Topic], st.SearchStrategy[Malformed]]


def _kind(
    kind: str,
    values: Callable[[Topic], st.SearchStrategy[bytes | None]],
    codes: frozenset[str] | None,
    keys: st.SearchStrategy[bytes | None] = _small_keys,
) -> Build:
    def build(topic: Topic) -> st.SearchStrategy[Malformed]:
        return st.builds(lambda key, value: Malformed(kind, key, value, (), codes), keys, values(topic))

    return build


def kinds(limit: int) -> dict[str, Build]:
    """Every kind of damage, by name; `limit` is the daemon's max_input_message_bytes."""
    return {
        # A record needs a key or a value, and a tombstone is a key without a value.
        "tombstone": _kind("tombstone", lambda t: st.none(), frozenset({"empty_message"}), keys=_present_keys),
        "empty": _kind("empty", lambda t: st.just(b""), frozenset({"empty_message"})),
        "invalid_utf8": _kind("invalid_utf8", _invalid_utf8_values, frozenset({"invalid_utf8"})),
        "not_json": _kind("not_json", _not_json, frozenset({"invalid_json"})),
        "not_object": _kind("not_object", _not_object, frozenset({"schema_violation"})),
        "schema": _kind("schema", _schema_violation, frozenset({"schema_violation"})),
        "version": _kind("version", _unknown_version, frozenset({"unsupported_schema_version"})),
        # Nesting past the parser's limit and integers past Python's 4,300 digits are unusable JSON.
        "deep_nesting": _kind("deep_nesting", _deep, frozenset({"invalid_json"})),
        "huge_int": _kind("huge_int", _huge_int, frozenset({"invalid_json"})),
        "non_finite": _kind("non_finite", _non_finite, frozenset({"schema_violation"})),
        "oversize": _kind("oversize", lambda t: _oversize(t, limit), frozenset({"message_too_large"})),
        "headers": lambda topic: st.builds(
            # Headers are kept, base64, in the dead letter; the value decides the code.
            lambda key, value, headers: Malformed("headers", key, value, headers, frozenset({"schema_violation"})),
            _small_keys,
            _schema_violation(topic),
            _headers(),
        ),
        "over_bounds": _kind(
            "over_bounds",
            _over_bounds,
            frozenset(
                {
                    "resolution_out_of_range",
                    "too_many_steps",
                    "batch_too_large",
                    "base_model_not_allowed",
                    "source_not_allowed",
                }
            ),
        ),
        "huge_key": lambda topic: st.builds(
            lambda size, fill, value: Malformed(
                "huge_key", bytes([fill]) * size, value, (), frozenset({"schema_violation"})
            ),
            st.integers(1024 * 1024, 1024 * 1024 + 512),
            st.integers(0, 255),
            _schema_violation(topic),
        ),
    }


def generate(strategy: st.SearchStrategy[Malformed], count: int) -> list[Malformed]:
    """`count` examples of `strategy`, the same on every run. Kinds with fewer distinct examples than
    `count` (a tombstone is a tombstone) repeat theirs."""
    found: list[Malformed] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Malformed) -> None:
        found.append(example)

    collect()
    assert found, "hypothesis generated nothing"
    return [found[i % len(found)] for i in range(count)]
