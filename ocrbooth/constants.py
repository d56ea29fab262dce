"""Wire names shared with producers, operators and dashboards. Changing one is a breaking change."""

from typing import Final

# Default topic names (each configurable through Settings.topics).
TOPIC_OCR_REQUESTS: Final = "ocr.requests"  # DocumentRequest in, keyed by document_id
TOPIC_OCR_RESULTS: Final = "ocr.results"  # OcrResult out, keyed by document_id
TOPIC_OCR_REVIEW: Final = "ocr.review"  # ReviewFlag out, keyed by document_id
TOPIC_FINETUNE_REQUESTS: Final = "finetune.requests"  # FinetuneRequest in, keyed by job_id
TOPIC_FINETUNE_CONTROL: Final = "finetune.control"  # FinetuneControl in, read by every replica
TOPIC_FINETUNE_EVENTS: Final = "finetune.events"  # FinetuneEvent out, keyed by job_id
TOPIC_DLQ: Final = "ocrbooth.dlq"  # DeadLetter out, keyed like the message that failed

# Kafka header keys the daemon writes on every output record.
HEADER_SCHEMA: Final = "ocrbooth-schema"  # model name of the value, e.g. "OcrResult"
HEADER_SCHEMA_VERSION: Final = "ocrbooth-schema-version"  # integer schema_version of the value
HEADER_SOURCE: Final = "ocrbooth-source"  # "topic/partition/offset" of the input that caused it

# S3 key prefixes inside the configured bucket.
S3_PREFIX_OFFLOAD: Final = "offload/"  # output events too large for Kafka: offload/{topic}/{key}/{id}.json
S3_PREFIX_UPLOADS: Final = "uploads/"  # documents uploaded by `ocrbooth submit`
S3_PREFIX_JOBS: Final = "jobs/"  # fine-tune job state and checkpoints: jobs/{job_id}/...
S3_PREFIX_CLASS_IMAGES: Final = "class-images/"  # prior-preservation images shared by jobs: class-images/{key}/
S3_PREFIX_STATE: Final = "state/"  # daemon state that must survive restarts: state/crashloop/{group}/{topic}/{p}.json

# Prometheus metric name prefix.
METRIC_PREFIX: Final = "ocrbooth"

# Current wire schema version of every event model.
SCHEMA_VERSION: Final = 1
