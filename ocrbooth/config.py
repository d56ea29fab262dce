"""Settings: one pydantic-settings model, read from OCRBOOTH_* variables and an optional YAML file.

Environment names follow the section layout: `OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS` is `kafka.bootstrap_servers`,
`OCRBOOTH_GROUP_ID` is `group_id`. Environment beats the YAML file, which beats the defaults.
"""

from __future__ import annotations

import contextvars
import tempfile
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ocrbooth import constants
from ocrbooth.errors import ConfigError

ENV_PREFIX = "OCRBOOTH_"

# Which YAML file the next Settings() reads; a contextvar so tests can load several configs side by side.
_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ocrbooth_config_file", default=None)


def _split_csv(value: object) -> object:
    """Accept `a,b` from the environment as well as a YAML list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class KafkaSettings(_Section):
    """Connection to the Kafka cluster."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of brokers."""
    client_id: str = "ocrbooth"
    """Client id reported to the brokers (shows up in broker logs and quotas)."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Transport security towards the brokers."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism; required when security_protocol is SASL_*."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password (redacted in logs)."""
    ssl_cafile: Path | None = None
    """CA bundle that signs the brokers' certificates."""
    ssl_certfile: Path | None = None
    """Client certificate for mutual TLS."""
    ssl_keyfile: Path | None = None
    """Private key of the client certificate."""
    enable_idempotence: bool = True
    """Idempotent producer. On for Apache Kafka; off for brokers that refuse InitProducerId (Tansu)."""
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    """Consumer group session timeout: a silent member is evicted after this long."""
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    """Consumer heartbeat period; keep it under a third of session_timeout_ms."""
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    """Longest pause between polls before the member is considered stuck."""
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=60_000)
    """Longest time the broker holds a fetch of the input partitions open waiting for new records. aiokafka
    sends one fetch per broker at a time, so a partition that has caught up (nothing new to read) keeps a
    backlogged partition on the same broker from being fetched again for up to this long."""
    request_timeout_ms: int = Field(default=40_000, ge=1_000)
    """Timeout of a single broker request, produce requests included."""
    linger_ms: int = Field(default=5, ge=0)
    """How long the producer waits to fill a batch of records sent one by one (dead letters, resends after a
    failed batch). Outputs go out in produce batches that fill during one event-loop turn and do not linger:
    honouring this there too measured no gain (12,164 against 12,134 events/s), only added latency."""
    max_batch_bytes: int = Field(default=512 * 1024, ge=1024)
    """Largest producer batch per partition. aiokafka keeps one open batch per partition and sends one request
    per broker at a time, so this bounds bytes per round trip (aiokafka's own default, 16 KiB, caps a busy
    daemon at a few hundred small results per round trip)."""
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    """Compression of produced batches."""

    def client_options(self) -> dict[str, Any]:
        """Connection keyword arguments shared by aiokafka consumers, producers and admin clients."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return opts


class S3Settings(_Section):
    """Object storage. Credentials come from the standard AWS variables or the pod's role."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:8333 for SeaweedFS; unset means AWS."""
    bucket: str = "ocrbooth"
    """Bucket for offloaded results, uploads and job state."""
    region: str | None = None
    """Region; unset means AWS_REGION / AWS_DEFAULT_REGION."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """TCP connect timeout of one S3 request."""
    read_timeout_s: float = Field(default=60.0, gt=0)
    """Read timeout of one S3 request."""
    allowed_buckets: Annotated[list[str], NoDecode] = []
    """Buckets documents may be read from (`a,b`); empty means only `bucket`. No other scheme is fetched."""
    output_buckets: Annotated[list[str], NoDecode] = []
    """Buckets a fine-tune request's output_uri may name (`a,b`); empty means only `bucket`."""

    @field_validator("allowed_buckets", "output_buckets", mode="before")
    @classmethod
    def _buckets_csv(cls, value: object) -> object:
        return _split_csv(value)

    def readable_buckets(self) -> set[str]:
        """Buckets requests may read from."""
        return set(self.allowed_buckets) or {self.bucket}

    def writable_buckets(self) -> set[str]:
        """Buckets requests may have outputs written to."""
        return set(self.output_buckets) or {self.bucket}


class TopicSettings(_Section):
    """Topic names; the defaults are the public contract."""

    ocr_requests: str = constants.TOPIC_OCR_REQUESTS
    """DocumentRequest input."""
    ocr_results: str = constants.TOPIC_OCR_RESULTS
    """OcrResult output."""
    ocr_review: str = constants.TOPIC_OCR_REVIEW
    """ReviewFlag output."""
    finetune_requests: str = constants.TOPIC_FINETUNE_REQUESTS
    """FinetuneRequest input."""
    finetune_control: str = constants.TOPIC_FINETUNE_CONTROL
    """FinetuneControl input, read by every replica."""
    finetune_events: str = constants.TOPIC_FINETUNE_EVENTS
    """FinetuneEvent output."""
    dlq: str = constants.TOPIC_DLQ
    """DeadLetter output."""


class RetrySettings(_Section):
    """Backoff for retryable failures (S3, broker): exponential with full jitter."""

    max_attempts: int = Field(default=5, ge=1, le=100)
    """Attempts of a handler before a retryable failure is dead-lettered."""
    initial_backoff_ms: int = Field(default=200, ge=1)
    """Backoff ceiling after the first failure; doubles each attempt."""
    max_backoff_ms: int = Field(default=10_000, ge=1)
    """Upper bound of any single backoff."""


class OcrSettings(_Section):
    """The OCR pipeline: engines, rendering, limits, the LightOnOCR engine core and review."""

    engine: Literal["auto", "lightonocr", "tesseract"] = "auto"
    """auto: lightonocr when CUDA is present and the model loads, else tesseract."""
    model: str = "lightonai/LightOnOCR-1B-1025"
    """LightOnOCR weights: hub id or local directory."""
    device: str | None = None
    """Torch device for lightonocr (default cuda:0)."""
    default_languages: Annotated[list[str], NoDecode] = []
    """Tesseract languages when a request names none; empty: detect each such page's language and orientation."""
    max_new_tokens: int = Field(default=4096, ge=1)
    """Output budget per page when a request names none."""
    max_new_tokens_cap: int = Field(default=8192, ge=1)
    """Largest max_new_tokens a request may ask for."""
    review_threshold: float = Field(default=0.80, ge=0, le=1)
    """Pages below this confidence flag their document for review (requests may override)."""
    span_threshold: float = Field(default=0.50, ge=0, le=1)
    """Tokens below this probability form low_confidence_spans."""
    render_longest_px: int = Field(default=1540, ge=64, le=10_000)
    """Longest side of a rendered page (the size LightOnOCR was trained at)."""
    max_dpi: int = Field(default=200, ge=36, le=1200)
    """PDF pages are never rendered above this resolution."""
    max_pages: int = Field(default=500, ge=1)
    """Documents with more pages (or requests selecting more) fail with too_many_pages."""
    max_image_pixels: int = Field(default=80_000_000, ge=1_000_000)
    """Images with more pixels fail with image_too_large (pixel-bomb guard)."""
    max_inline_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest inline (base64-decoded) document. Its base64 form (4/3 of it) must fit in
    max_input_message_bytes; larger documents belong in S3."""
    max_source_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    """Largest document fetched from S3."""
    render_workers: int = Field(default=2, ge=1, le=64)
    """Processes rendering pages (CPU), overlapping with GPU work."""
    tesseract_threads: int = Field(default=2, ge=1, le=64)
    """Tesseract pages recognised in parallel."""
    engine_max_slots: int = Field(default=256, ge=1, le=4096)
    """LightOnOCR: pages decoding together at most (the KV cache may allow fewer)."""
    gpu_memory_fraction: float = Field(default=0.90, gt=0, le=1)
    """LightOnOCR: share of the card's memory the engine may hold (weights, activations, KV cache)."""
    kv_cache_tokens: int | None = Field(default=None, ge=64)
    """LightOnOCR: fixed KV cache size in token positions; unset sizes it from free GPU memory."""
    max_prefill_tokens: int = Field(default=16_384, ge=1)
    """LightOnOCR: prompt tokens (image + template) vision-encoded and prefilled per engine step."""
    decode_steps_per_sync: int = Field(default=8, ge=1, le=256)
    """LightOnOCR: decode steps between the host's looks at the GPU (a finished page waits at most this)."""
    preprocess_threads: int = Field(default=4, ge=1, le=64)
    """LightOnOCR: threads resizing and normalizing pages ahead of the GPU."""
    prefill_overlap: Literal["stream", "priority", "serial"] = "stream"
    """LightOnOCR: how admitted pages' vision encoding and prefill share the GPU with decoding: on a second CUDA
    stream (`stream`), the same with decoding's stream at the highest priority (`priority`), or between decode
    chunks on one stream (`serial`)."""
    fused_norms: bool = True
    """LightOnOCR: run the model's RMSNorm layers as one fused PyTorch kernel each (`F.rms_norm`) instead of
    transformers' eight small ones; outputs differ from transformers' by at most one bfloat16 rounding. On
    an H100, 256 pages x 500 tokens went from 6.98 to 7.98 pages/s with it (a decode step of 175 slots 21.8 ->
    20.0 ms, a prefill page 70.7 -> 61.3 ms)."""
    kv_cache_dtype: Literal["auto", "fp8_e4m3"] = "auto"
    """LightOnOCR: the KV cache's element type: `auto` (the model's, bfloat16 on a GPU) or `fp8_e4m3` (half the
    bytes each decode step reads, which is most of a decode step's time, and twice the positions in the same
    memory; keys and values are rounded to FP8 as they are written, so outputs change: a choice, not a default)."""
    compile_layers: bool = False
    """LightOnOCR: run each decoder and vision-encoder layer through torch.compile (Inductor fuses the norms,
    rotary embeddings, SwiGLU and residual adds between the attention calls; compiled while the engine loads,
    tens of seconds); a compile failure falls back to eager layers with a warning. Off until a GPU run has
    measured it."""
    render_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Longest a page may take to render in its worker; the worker is then killed and replaced, and the
    document fails with render_timeout."""
    render_worker_max_bytes: int = Field(default=2 * 1024**3, ge=256 * 1024**2)
    """Address-space cap (RLIMIT_AS) of each render worker, about 0.55 GiB of it taken by the interpreter and
    MuPDF; a page needing more fails with render_out_of_memory."""
    max_page_memory_bytes: int = Field(default=512 * 1024**2, ge=1024**2)
    """Pixels of rendered pages held in the daemon (rendered, not yet recognised), across all documents; while
    spent, no new pages are rendered and the OCR partitions pause."""
    render_ahead_pages: int = Field(default=8, ge=1, le=1024)
    """Pages of one document rendered or waiting for the engine at once (its look-ahead window)."""

    @field_validator("default_languages", mode="before")
    @classmethod
    def _languages_csv(cls, value: object) -> object:
        return _split_csv(value)


# Stable Diffusion pipelines in diffusers format on the Hugging Face hub, allowed unless the operator says
# otherwise (the first is `ocrbooth finetune`'s default).
DEFAULT_BASE_MODELS: Final = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "CompVis/stable-diffusion-v1-4",
    "stabilityai/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base",
)


class FinetuneSettings(_Section):
    """DreamBooth jobs: operator bounds every request must fit, GPU slots, attempts."""

    max_concurrent_jobs: int = Field(default=1, ge=1, le=64)
    """Trainer subprocesses per daemon (GPU slots); the finetune partitions pause while all are busy."""
    max_attempts: int = Field(default=3, ge=1, le=20)
    """Trainer runs per job (a crash resumes from the last checkpoint) before the job fails."""
    max_train_steps: int = Field(default=5_000, ge=1)
    """Largest max_train_steps (and lr_warmup_steps) a request may ask for (too_many_steps)."""
    min_resolution: int = Field(default=64, ge=8)
    """Smallest training resolution (resolution_out_of_range)."""
    max_resolution: int = Field(default=1024, ge=8)
    """Largest training resolution (resolution_out_of_range)."""
    max_instance_images: int = Field(default=20, ge=1)
    """Most subject photos per job (too_many_images)."""
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    """Largest single subject photo (image_too_large)."""
    max_class_images: int = Field(default=1_000, ge=0)
    """Most class images a request may ask for (too_many_images)."""
    max_train_batch_size: int = Field(default=16, ge=1)
    """Largest train_batch_size (batch_too_large)."""
    max_gradient_accumulation_steps: int = Field(default=64, ge=1)
    """Largest gradient_accumulation_steps (too_many_steps): each optimizer step costs this many batches."""
    max_checkpoints_per_job: int = Field(default=100, ge=1)
    """Most checkpoints a job may write, max_train_steps / checkpointing_steps (too_many_checkpoints)."""
    max_checkpoints_total_limit: int = Field(default=10, ge=1)
    """Largest checkpoints_total_limit, the checkpoints kept at once in S3 (too_many_checkpoints)."""
    max_validation_prompts: int = Field(default=8, ge=0)
    """Most validation prompts per request (too_many_prompts)."""
    max_validation_images: int = Field(default=16, ge=0)
    """Most validation images per prompt (too_many_images)."""
    max_inference_steps: int = Field(default=200, ge=1)
    """Largest num_inference_steps of class and validation images (too_many_steps)."""
    max_prompt_bytes: int = Field(default=1_024, ge=16)
    """Longest prompt (instance, class, each validation prompt), in UTF-8 bytes (string_too_long); CLIP reads
    only the first 77 tokens anyway."""
    max_uri_bytes: int = Field(default=1_024, ge=64)
    """Longest URI (each instance_images entry, output_uri), in UTF-8 bytes (string_too_long); an S3 key itself
    is at most 1024 bytes."""
    max_base_model_bytes: int = Field(default=1_024, ge=16)
    """Longest base_model, in UTF-8 bytes (string_too_long)."""
    allowed_base_models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_BASE_MODELS))
    """Base models a request may name (`a,b`): hub ids (exact) and `s3://bucket/prefix/` prefixes; the default
    is four Stable Diffusion hub ids; empty allows none (base_model_not_allowed)."""
    allow_local_base_models: bool = False
    """Also allow any local path as base_model (a directory on the daemon's disk); for tests and development."""
    progress_every_steps: int = Field(default=10, ge=1)
    """A progress event every this many steps."""
    stop_timeout_s: float = Field(default=120.0, gt=0)
    """Time a trainer gets to checkpoint and exit after SIGTERM (drain or cancel)."""
    workdir: Path = Path(tempfile.gettempdir()) / "ocrbooth-jobs"
    """Local scratch space for trainers (checkpoints are written here, then uploaded)."""
    devices: int = Field(default=1, ge=1, le=64)
    """GPUs per job; above one, Lightning's DDP."""
    cuda_graphs: bool = True
    """On one GPU, capture the training micro-step (forward + backward) and the class-image UNet step in CUDA
    graphs and replay them: no per-kernel launch cost and no compilation (on an H100 2.15x and 2.83x the
    steps/s of a typical training loop, text encoder trained and frozen, at 0.79x its peak memory;
    bench/README.md). Never used under DDP, fp16's grad scaler or gradient checkpointing; a capture error falls
    back to eager with a warning; false runs the eager step."""
    compile: bool = False
    """torch.compile the training step and the class-image UNet on GPUs instead of CUDA graphs. Off by default:
    measured on an H200, compiling SD 1.5's UNet + text encoder took 188 s and saved 26 ms a step against the
    eager step (bench/README.md). A compile error falls back to eager with a warning."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """Inductor mode of the training step; `reduce-overhead` adds CUDA graphs."""
    class_images_batch_size: int = Field(default=0, ge=0, le=256)
    """Class images generated per batch; 0 picks it from the GPU's free memory."""

    @field_validator("allowed_base_models", mode="before")
    @classmethod
    def _models_csv(cls, value: object) -> object:
        return _split_csv(value)


class LogSettings(_Section):
    """Logging output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Minimum level."""
    format: Literal["auto", "json", "console"] = "auto"
    """json in Kubernetes, console in a terminal; auto picks by whether stderr is a TTY."""


class Settings(BaseSettings):
    """Everything the daemon reads at startup."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    """Kafka connection."""
    s3: S3Settings = S3Settings()
    """Object storage."""
    topics: TopicSettings = TopicSettings()
    """Topic names."""
    retry: RetrySettings = RetrySettings()
    """Retry and backoff."""
    log: LogSettings = LogSettings()
    """Logging."""
    ocr: OcrSettings = OcrSettings()
    """OCR pipeline."""
    finetune: FinetuneSettings = FinetuneSettings()
    """DreamBooth jobs."""

    group_id: str = Field(default="ocrbooth", min_length=1)
    """Consumer group shared by all replicas."""
    handlers: Annotated[list[str], NoDecode] = ["ocr", "finetune"]
    """Handlers to run: built-in names (ocr, finetune, echo) or `module:Class`."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics and health server; 0.0.0.0 inside a pod."""
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    """Port of /metrics, /healthz and /readyz (0 picks a free one)."""
    max_in_flight: int = Field(default=64, ge=1, le=100_000)
    """Messages accepted but not yet committed, per handler (its partitions together); bounds redelivery after a
    crash, and keeps one handler's backlog from starving another's topics."""
    max_message_bytes: int = Field(default=1_000_000, ge=1_024)
    """Largest output value sent to Kafka; larger outputs are offloaded to S3."""
    max_input_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1_024)
    """Largest input value accepted; larger ones are dead-lettered as message_too_large."""
    dlq_max_value_bytes: int = Field(default=64 * 1024, ge=0)
    """Bytes of the original value kept in a DeadLetter (and of its headers together); the rest is cut and
    value_truncated / headers_truncated is set."""
    dlq_max_key_bytes: int = Field(default=1_024, ge=0, le=1_048_576)
    """Bytes of the original key kept in a DeadLetter (and as its record key); key_truncated says when cut."""
    max_key_bytes: int = Field(default=4_096, ge=16, le=1_048_576)
    """Largest record key of an output; a result whose key is longer fails as output_too_large."""
    max_process_deaths: int = Field(default=3, ge=0, le=100)
    """Times the daemon may die while handling one message before it is dead-lettered as crash_loop
    (0 turns crash-loop protection off, and with it the S3 record of in-flight offsets)."""
    outage_budget_s: float = Field(default=600.0, gt=0)
    """How long a message waits out an S3 outage (S3 unreachable or answering 5xx) before it fails with
    retries_exhausted; meanwhile no new work is taken and /readyz answers 503."""
    drain_timeout_s: float = Field(default=25.0, gt=0)
    """Time in-flight work gets to finish on shutdown; keep below the pod's grace period."""
    commit_interval_ms: int = Field(default=1_000, ge=10)
    """Longest time completed offsets wait before a commit (commits also follow completions at once)."""
    pause_after_ms: int = Field(default=500, ge=0, le=60_000)
    """How long the in-flight slots may stay full before the partitions are paused (short waits keep
    the client prefetching; long ones must not buffer or lose the group)."""
    commit_coalesce_ms: int = Field(default=5, ge=0, le=1_000)
    """After a completion, wait this long so that completions arriving together share one commit (not while the
    fetch loop waits for room: then the commit goes out at once, since only a commit frees the budget)."""
    poll_timeout_ms: int = Field(default=100, ge=1)
    """Longest wait of one fetch when nothing arrives."""
    gc_gen0_threshold: int = Field(default=100_000, ge=0)
    """Young-generation threshold of Python's cycle collector (CPython's default is 700; 0 keeps it). Above the
    objects that a full window of in-flight messages keeps alive, so collections do not walk them again and
    again (see `daemon/gctune.py`)."""
    gc_freeze: bool = True
    """Move everything that exists after startup (modules, loaded models) out of the collector's sight."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The asyncio event loop the daemon runs on: `uvloop` (libuv, the loop uvicorn uses; about a third less
    CPU per message on the daemon's path, `bench/runtime_overhead.py`), the standard library's `asyncio`, or
    `auto`: uvloop where it is installed (it is a dependency on Linux and macOS), else asyncio."""
    fatal_exit_code: int = Field(default=70, ge=1, le=255)
    """Exit status after a fatal error (EX_SOFTWARE), so the orchestrator restarts the pod."""

    @field_validator("handlers", mode="before")
    @classmethod
    def _handlers_csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        problems: list[str] = []
        k = self.kafka
        if k.security_protocol.startswith("SASL_"):
            if k.sasl_mechanism is None:
                problems.append("kafka.sasl_mechanism: required when security_protocol is SASL_*")
            if not k.sasl_username or k.sasl_password is None:
                problems.append("kafka.sasl_username/sasl_password: required when security_protocol is SASL_*")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(k, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"kafka.{name}: file {path} does not exist")
        if (k.ssl_certfile is None) != (k.ssl_keyfile is None):
            problems.append("kafka.ssl_certfile/ssl_keyfile: give both or neither")
        if k.heartbeat_interval_ms * 3 > k.session_timeout_ms:
            problems.append("kafka.heartbeat_interval_ms: must be at most a third of session_timeout_ms")
        if not self.handlers:
            problems.append("handlers: at least one handler is required")
        if len(set(self.handlers)) != len(self.handlers):
            problems.append("handlers: a handler is listed twice")
        if self.retry.initial_backoff_ms > self.retry.max_backoff_ms:
            problems.append("retry.initial_backoff_ms: must not exceed retry.max_backoff_ms")
        problems += self._size_problems()
        topic_names = list(self.topics.model_dump().values())
        if len(set(topic_names)) != len(topic_names):
            problems.append("topics: every topic needs its own name")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _size_problems(self) -> list[str]:
        """Limits that contradict each other, so that one of them could never apply."""
        problems: list[str] = []
        # An inline document travels base64-encoded (4 bytes per 3) inside one input message.
        inline_b64 = -(-self.ocr.max_inline_bytes // 3) * 4
        if inline_b64 > self.max_input_message_bytes:
            problems.append(
                f"ocr.max_inline_bytes: {self.ocr.max_inline_bytes} is {inline_b64} bytes in base64, over "
                f"max_input_message_bytes ({self.max_input_message_bytes}): keep it at most 3/4 of that"
            )
        if self.ocr.max_inline_bytes > self.ocr.max_source_bytes:
            problems.append("ocr.max_inline_bytes: must not exceed ocr.max_source_bytes")
        f = self.finetune
        if f.min_resolution > f.max_resolution:
            problems.append("finetune.min_resolution: must not exceed finetune.max_resolution")
        return problems

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as plain data with secrets masked, for the startup log line."""
        return self.model_dump(mode="json")


def _env_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + "_".join(parts).upper()


def _problems(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:  # the cross-field validator: one message per problem
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.extend(msg.split("; "))
            continue
        where = ".".join(str(p) for p in loc)
        lines.append(f"{where}: {err['msg']} (env {_env_name(loc)})")
    return lines


def _defaults_for(locs: list[tuple[int | str, ...]]) -> dict[str, Any]:
    """Init overrides that put each failing field back to its default, so a second pass can run
    the cross-field checks too and every problem is reported in one go."""
    overrides: dict[str, Any] = {}
    for loc in locs:
        model: type[BaseModel] = Settings
        target = overrides
        for i, part in enumerate(loc):
            if not isinstance(part, str) or part not in model.model_fields:
                break
            field = model.model_fields[part]
            annotation = field.annotation
            if i == len(loc) - 1 or not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                target[part] = field.get_default(call_default_factory=True)
                break
            target = target.setdefault(part, {})
            model = annotation
    return overrides


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings; raise ConfigError listing every problem at once."""
    if config_file is not None:
        _check_config_file(config_file)
    token = _CONFIG_FILE.set(config_file)
    try:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            problems = _problems(exc)
            failing = [tuple(e["loc"]) for e in exc.errors() if e["loc"]]
            if failing:
                try:
                    Settings(**{**overrides, **_defaults_for(failing)})
                except ValidationError as second:
                    problems += [p for p in _problems(second) if p not in problems]
            raise ConfigError("invalid settings:\n" + "\n".join(f"  {p}" for p in problems)) from None
    finally:
        _CONFIG_FILE.reset(token)


def _check_config_file(path: Path) -> None:
    """ConfigError naming what is wrong with the YAML file itself (missing, unreadable, not YAML, not a mapping),
    which pydantic-settings would otherwise report as a traceback."""
    import yaml

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"invalid settings:\n  --config: {path} {problem}")

    if path.is_dir():
        raise fail("is a directory, not a YAML file")
    if not path.exists():
        raise fail("does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise fail("is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise fail(f"is not valid YAML: {problem}{where}") from None
    if data is not None and not isinstance(data, dict):
        raise fail(
            f"must hold a mapping of settings (e.g. `kafka: {{bootstrap_servers: ...}}`), not a {type(data).__name__}"
        )
