"""Fine-tune request bounds: every operator bound refuses with its own code before any work, and has a setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ocrbooth.cli import build_parser
from ocrbooth.config import DEFAULT_BASE_MODELS, Settings, load_settings
from ocrbooth.daemon.decode import decode
from ocrbooth.errors import PoisonError
from ocrbooth.handlers.finetune import FinetuneHandler
from ocrbooth.models.dreambooth import validate_request
from ocrbooth.schemas import FinetuneRequest

BUCKET = "ocrbooth"
JOB = "job-1"


def _request(**overrides: Any) -> FinetuneRequest:
    fields: dict[str, Any] = {
        "job_id": JOB,
        "base_model": DEFAULT_BASE_MODELS[0],
        "instance_images": [f"s3://{BUCKET}/uploads/{JOB}/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
    }
    return FinetuneRequest.model_validate(fields | overrides)


def _settings(finetune: dict[str, Any] | None = None, s3: dict[str, Any] | None = None) -> Settings:
    return load_settings(finetune=finetune or {}, s3={"bucket": BUCKET, **(s3 or {})})


def _code(request: FinetuneRequest, settings: Settings | None = None) -> str:
    with pytest.raises(PoisonError) as caught:
        validate_request(request, settings or _settings())
    return caught.value.code


def test_a_request_within_every_default_bound_passes() -> None:
    """The minimal request, with a default hub model, passes the default bounds."""
    validate_request(_request(), _settings())


def test_the_cli_default_base_model_is_allowed_by_default(tmp_path: Path) -> None:
    """`ocrbooth finetune` without --base-model names a model the default allowlist takes."""
    args = build_parser().parse_args(["finetune", str(tmp_path), "--instance-prompt", "p", "--class-prompt", "c"])
    assert args.base_model in DEFAULT_BASE_MODELS
    validate_request(_request(base_model=args.base_model), _settings())


# (code, request overrides that break the default bound, settings that allow the same request again)
BOUNDS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "base_model length": (
        "string_too_long",
        {"base_model": "/models/" + "b" * 100_000},
        {"max_base_model_bytes": 200_000, "allow_local_base_models": True},
    ),
    "instance_prompt length": ("string_too_long", {"instance_prompt": "é" * 600}, {"max_prompt_bytes": 1200}),
    "class_prompt length": ("string_too_long", {"class_prompt": "x" * 1025}, {"max_prompt_bytes": 2000}),
    "validation prompt length": (
        "string_too_long",
        {"validation_prompts": ["ok", "x" * 1025]},
        {"max_prompt_bytes": 2000},
    ),
    "instance image URI length": (
        "string_too_long",
        {"instance_images": [f"s3://{BUCKET}/" + "k/" * 505 + "a.png"]},  # the key itself fits S3's 1024 bytes
        {"max_uri_bytes": 2000},
    ),
    "output_uri length": (
        "string_too_long",
        {"output_uri": f"s3://{BUCKET}/jobs/{JOB}/" + "o/" * 500},
        {"max_uri_bytes": 2000},
    ),
    "resolution": ("resolution_out_of_range", {"resolution": 2048}, {"max_resolution": 2048}),
    "max_train_steps": ("too_many_steps", {"max_train_steps": 5001}, {"max_train_steps": 5001}),
    "lr_warmup_steps": ("too_many_steps", {"lr_warmup_steps": 6000}, {"max_train_steps": 6000}),
    "gradient_accumulation_steps": (
        "too_many_steps",
        {"gradient_accumulation_steps": 65},
        {"max_gradient_accumulation_steps": 65},
    ),
    "num_inference_steps": ("too_many_steps", {"num_inference_steps": 1000}, {"max_inference_steps": 1000}),
    "instance images count": (
        "too_many_images",
        {"instance_images": [f"s3://{BUCKET}/in/{i}.png" for i in range(21)]},
        {"max_instance_images": 21},
    ),
    "num_class_images": ("too_many_images", {"num_class_images": 1001}, {"max_class_images": 1001}),
    "num_validation_images": ("too_many_images", {"num_validation_images": 17}, {"max_validation_images": 17}),
    "validation prompts count": (
        "too_many_prompts",
        {"validation_prompts": [f"prompt {i}" for i in range(9)]},
        {"max_validation_prompts": 9},
    ),
    "checkpoint frequency": (
        "too_many_checkpoints",
        {"max_train_steps": 800, "checkpointing_steps": 1},
        {"max_checkpoints_per_job": 800},
    ),
    "checkpoints_total_limit": (
        "too_many_checkpoints",
        {"checkpoints_total_limit": 11},
        {"max_checkpoints_total_limit": 11},
    ),
    "train_batch_size": ("batch_too_large", {"train_batch_size": 17}, {"max_train_batch_size": 17}),
    "local base model": ("base_model_not_allowed", {"base_model": "/etc"}, {"allow_local_base_models": True}),
    "hub base model": ("base_model_not_allowed", {"base_model": "someone/sd"}, {"allowed_base_models": ["someone/sd"]}),
    "s3 base model": (
        "base_model_not_allowed",
        {"base_model": f"s3://{BUCKET}/models/sd/"},
        {"allowed_base_models": [f"s3://{BUCKET}/models/"]},
    ),
}


@pytest.mark.parametrize("bound", sorted(BOUNDS))
def test_each_bound_refuses_with_its_code_and_its_setting_lifts_it(bound: str) -> None:
    """A request just past a default bound fails with that bound's code; the bound's setting raised, it passes."""
    code, overrides, allowing = BOUNDS[bound]
    request = _request(**overrides)
    assert _code(request) == code
    validate_request(request, _settings(allowing))


@pytest.mark.parametrize(
    "base_model",
    ["/etc", "/", "./models/sd", "../sd", "~/sd", "models/sd/unet", "C:\\sd", "a/../b", "sd\x00"],
)
def test_local_paths_are_refused_unless_explicitly_enabled(base_model: str) -> None:
    """Anything that is neither a hub id nor s3:// is a local path, refused by default."""
    assert _code(_request(base_model=base_model)) == "base_model_not_allowed"


def test_an_allowed_local_path_must_not_hold_control_characters() -> None:
    """Even with local paths allowed, a path with a NUL byte (which would crash the trainer) is refused."""
    settings = _settings({"allow_local_base_models": True})
    validate_request(_request(base_model="/models/sd"), settings)
    assert _code(_request(base_model="/models/sd\x00x"), settings) == "base_model_not_allowed"


def test_an_empty_allowlist_allows_no_hub_model() -> None:
    """An operator who clears the allowlist allows no hub id at all (not every id)."""
    assert _code(_request(), _settings({"allowed_base_models": []})) == "base_model_not_allowed"


@pytest.mark.parametrize(
    "base_model",
    [f"s3://{BUCKET}/models-evil/sd/", f"s3://{BUCKET}/other/sd/", f"s3://{BUCKET}/mod"],
)
def test_s3_base_models_must_be_under_an_allowed_prefix(base_model: str) -> None:
    """`s3://b/models/` allows what is under it, not a sibling that shares its first letters."""
    settings = _settings({"allowed_base_models": [f"s3://{BUCKET}/models/"]})
    validate_request(_request(base_model=f"s3://{BUCKET}/models/sd/"), settings)
    validate_request(_request(base_model=f"s3://{BUCKET}/models"), settings)  # the prefix itself
    assert _code(_request(base_model=base_model), settings) == "base_model_not_allowed"


def test_a_base_model_in_a_foreign_bucket_is_source_not_allowed() -> None:
    """An allowlisted prefix in a bucket the daemon may not read still fails, as source_not_allowed."""
    settings = _settings({"allowed_base_models": ["s3://elsewhere/"]})
    assert _code(_request(base_model="s3://elsewhere/sd/"), settings) == "source_not_allowed"


def test_instance_images_in_a_foreign_bucket_are_source_not_allowed() -> None:
    """Instance images outside `s3.allowed_buckets` fail with source_not_allowed."""
    assert _code(_request(instance_images=["s3://elsewhere/dog.png"])) == "source_not_allowed"


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://{BUCKET}/uploads/../jobs/other/",
        f"s3://{BUCKET}/uploads/./dog.png",
        f"s3://{BUCKET}/uploads//dog.png",
        f"s3://{BUCKET}//dog.png",
        f"s3://{BUCKET}/uploads\\dog.png",
        f"s3://{BUCKET}/uploads/dog\n.png",
        f"s3://{BUCKET}/..",
        "s3://bad bucket/dog.png",
    ],
)
@pytest.mark.parametrize("field", ["instance_images", "base_model", "output_uri"])
def test_non_canonical_s3_uris_are_invalid_uri(field: str, uri: str) -> None:
    """`..`, `.`, empty segments, backslashes and control characters in any s3:// URI fail as invalid_uri."""
    if field == "output_uri":
        uri = uri.replace("/uploads", f"/jobs/{JOB}")
    value: Any = [uri] if field == "instance_images" else uri
    settings = _settings({"allowed_base_models": [DEFAULT_BASE_MODELS[0], f"s3://{BUCKET}/"]})
    assert _code(_request(**{field: value}), settings) == "invalid_uri"


@pytest.mark.parametrize(
    ("output_uri", "allowed"),
    [
        (f"s3://{BUCKET}/jobs/{JOB}/output/", True),
        (f"s3://{BUCKET}/jobs/{JOB}", True),
        (f"s3://{BUCKET}/jobs/{JOB}/exports/v2/", True),
        (f"s3://{BUCKET}/jobs/other-job/output/", False),
        (f"s3://{BUCKET}/jobs/{JOB}-2/output/", False),
        (f"s3://{BUCKET}/jobs/", False),
        (f"s3://{BUCKET}/output/", False),
        (f"s3://{BUCKET}/jobs/{JOB}/checkpoints/", False),
        (f"s3://{BUCKET}/jobs/{JOB}/checkpoints/step-000002/", False),
        (f"s3://elsewhere/jobs/{JOB}/output/", False),
    ],
)
def test_output_uri_only_under_the_jobs_own_prefix_in_a_writable_bucket(output_uri: str, allowed: bool) -> None:
    """output_uri must be under `jobs/{job_id}/` (not its checkpoints) in a writable bucket."""
    request = _request(output_uri=output_uri)
    if allowed:
        validate_request(request, _settings())
    else:
        assert _code(request) == "output_uri_not_allowed"


def test_output_buckets_setting_adds_writable_buckets() -> None:
    """`s3.output_buckets` names other buckets outputs may go to (still under the job's own prefix)."""
    settings = _settings(s3={"output_buckets": ["results"]})
    validate_request(_request(output_uri=f"s3://results/jobs/{JOB}/"), settings)
    assert _code(_request(output_uri=f"s3://results/shared/{JOB}/"), settings) == "output_uri_not_allowed"
    # Listing other buckets replaces the default: the configured bucket is no longer writable by requests.
    assert _code(_request(output_uri=f"s3://{BUCKET}/jobs/{JOB}/"), settings) == "output_uri_not_allowed"


def test_every_problem_is_named_in_a_short_message_with_the_first_code() -> None:
    """Many problems at once: the first one's code, each kind named, the message bounded in size."""
    request = _request(
        base_model="x" * 100_000,
        resolution=4096,
        instance_images=[f"s3://{BUCKET}/a/../{i}.png" for i in range(5000)],
    )
    with pytest.raises(PoisonError) as caught:
        validate_request(request, _settings({"max_uri_bytes": 4096}))
    message = caught.value.message
    assert caught.value.code == "string_too_long"
    assert "resolution 4096" in message
    assert "instance_images count 5000" in message
    assert "more" in message
    assert len(message) < 4000


def test_a_100kb_base_model_fails_at_decode_speed_with_a_code() -> None:
    """A 100 KB base_model decodes, then the handler's validate() refuses it as string_too_long (no trainer)."""
    raw = json.dumps(
        {
            "job_id": JOB,
            "base_model": "/" + "a" * 100_000,
            "instance_images": [f"s3://{BUCKET}/in/"],
            "instance_prompt": "p",
            "with_prior_preservation": False,
        }
    ).encode()
    event = decode(raw, FinetuneRequest, max_bytes=16 * 1024 * 1024)
    handler = FinetuneHandler(_settings({"allow_local_base_models": True}))
    with pytest.raises(PoisonError) as caught:
        handler.validate(event)
    assert caught.value.code == "string_too_long"
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("seed", [2**32, 10**30])
def test_seeds_beyond_32_bits_are_schema_violations(seed: int) -> None:
    """A seed Lightning would silently replace with a random one is refused by the schema."""
    raw = json.dumps({**_request().model_dump(mode="json"), "seed": seed}).encode()
    with pytest.raises(PoisonError) as caught:
        decode(raw, FinetuneRequest, max_bytes=1 << 20)
    assert caught.value.code == "schema_violation"
    assert _request(seed=2**32 - 1).seed == 2**32 - 1


# Fields with no operator setting, and why that is safe.
UNBOUNDED_BY_SETTINGS = {
    "job_id": "the schema's pattern: at most 128 characters of [A-Za-z0-9._-]",
    "seed": "the schema: 0 to 2^32 - 1",
    "learning_rate": "finite by the schema; its size changes the weights, not the cost",
    "prior_loss_weight": "finite by the schema; its size changes the weights, not the cost",
    "guidance_scale": "finite by the schema; its size changes the samples, not the cost",
}


def test_every_sized_request_field_has_a_bound_or_a_reason() -> None:
    """Each field with a size (number, string, list) is covered by a bound above or listed with its reason, so a
    field added later cannot go unbounded unnoticed."""
    bounded = {name for _, overrides, _ in BOUNDS.values() for name in overrides}
    sized = {
        name
        for name, field in FinetuneRequest.model_fields.items()
        if field.annotation is not bool and "Literal" not in str(field.annotation)
    }
    assert sized - bounded - set(UNBOUNDED_BY_SETTINGS) == set()
    assert sized >= set(UNBOUNDED_BY_SETTINGS)
