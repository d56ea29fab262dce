"""Every float field of every wire model refuses NaN and ±Infinity, as JSON literals and as Python values."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from ocrbooth.daemon.decode import decode
from ocrbooth.errors import PoisonError
from ocrbooth.schemas import ALL_MODELS, FinetuneRequest

# What Python's json module (the decoder's slow path) and pydantic's own parser read as non-finite floats.
NON_FINITE = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"]


def _has_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) is typing.Annotated:
        return _has_float(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_has_float(arg) for arg in typing.get_args(annotation))
    return False


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    """`model` and every model nested in its fields (lists and unions included)."""
    if model in seen:
        return
    seen.add(model)

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _models(annotation, seen)
        for arg in typing.get_args(annotation):
            walk(arg)

    for field in model.model_fields.values():
        walk(field.annotation)


def _float_fields() -> list[tuple[type[BaseModel], str]]:
    seen: set[type[BaseModel]] = set()
    for model in ALL_MODELS.values():
        _models(model, seen)
    return sorted(
        ((m, name) for m in seen for name, f in m.model_fields.items() if _has_float(f.annotation)),
        key=lambda pair: (pair[0].__name__, pair[1]),
    )


FLOAT_FIELDS = _float_fields()


def test_the_float_fields_are_found() -> None:
    """The walk finds the float fields named in the issue (and the nested ones), so the tests below test something."""
    names = {f"{m.__name__}.{n}" for m, n in FLOAT_FIELDS}
    assert {
        "FinetuneRequest.guidance_scale",
        "FinetuneRequest.learning_rate",
        "FinetuneRequest.prior_loss_weight",
        "FinetuneEvent.loss",
        "Timings.total",
        "Span.confidence",
        "OcrOptions.review_threshold",
    } <= names
    assert len(names) >= 15


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize(("model", "field"), FLOAT_FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FLOAT_FIELDS])
def test_every_float_field_refuses_non_finite_json(model: type[BaseModel], field: str, literal: str) -> None:
    """The field alone in a JSON object is refused as not finite (other fields may be missing; only this one is
    asserted), through pydantic's JSON parser and through Python's json module alike."""
    raw = '{"%s": %s}' % (field, literal)  # noqa: UP031  (a JSON literal json.dumps would not write)
    for validate in (lambda: model.model_validate_json(raw), lambda: model.model_validate(json.loads(raw))):
        with pytest.raises(ValidationError) as caught:
            validate()
        errors = {err["type"] for err in caught.value.errors() if err["loc"] == (field,)}
        assert errors == {"finite_number"}, caught.value.errors()


def _finetune(**overrides: Any) -> dict[str, Any]:
    return {
        "job_id": "j",
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_images": ["s3://ocrbooth/in/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        **overrides,
    }


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("field", ["guidance_scale", "learning_rate", "prior_loss_weight"])
def test_decode_dead_letters_a_finetune_request_with_a_non_finite_number(field: str, literal: str) -> None:
    """The consumer's decode turns `Infinity` and friends in a FinetuneRequest into schema_violation, before any
    handler sees the request; the same request with a finite value decodes."""
    good = json.dumps(_finetune(**{field: 2.5}))
    decode(good.encode(), FinetuneRequest, max_bytes=1 << 20)
    bad = good.replace(": 2.5", f": {literal}")
    with pytest.raises(PoisonError) as caught:
        decode(bad.encode(), FinetuneRequest, max_bytes=1 << 20)
    assert caught.value.code == "schema_violation"
    assert field in caught.value.message
