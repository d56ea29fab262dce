"""`ocrbooth` command line: run, dev, demo, submit, finetune, generate, train, schemas.

Exit status: 0 done, 1 the work failed (a service unreachable, an output not writable, a document failed),
2 the command line, an input it names or the settings are wrong; `run` exits 70 after a fatal error.
Failures print one line on stderr saying what is wrong and what to do, never a traceback (`--debug` adds it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocrbooth import __version__
from ocrbooth.errors import ConfigError, OcrboothError
from ocrbooth.localfs import ensure_writable_dir

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # what argparse uses for its own errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# Language codes as tesseract names its packs (eng, chi_sim) and ISO 639-1 (en): no paths, no blanks.
_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]{1,8})*")


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see by itself; reported as argparse reports its own
    errors (the subcommand's usage line, then one line), exit status 2."""


class CommandError(Exception):
    """The command line was fine but the work could not be done; one line, exit status 1."""


# ------------------------------------------------------------------------------------- argument types


def _int_in(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {bound}{what}")
        return value

    return parse


def _float_over(low: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: must be {'at least' if inclusive else 'over'} {low:g}"
            )
        return value

    return parse


_port = _int_in(0, 65535, " (0 picks a free port)")
_positive_int = _int_in(1)
_non_negative_int = _int_in(0)
_positive_float = _float_over(0.0, inclusive=False)
_non_negative_float = _float_over(0.0, inclusive=True)


def _languages(text: str) -> list[str]:
    codes = [part.strip() for part in text.split(",")]
    bad = [code for code in codes if not _LANGUAGE_CODE.fullmatch(code)]
    if bad:
        shown = ", ".join(repr(code) for code in bad)
        raise argparse.ArgumentTypeError(f"{shown} is not a language code; give codes like eng,fra separated by commas")
    return list(dict.fromkeys(codes))


def _input_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _input_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return path


def _output_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path


def _make_output_dir(path: Path, option: str) -> None:
    """Create an output directory before any work, so an unwritable one costs nothing."""
    try:
        ensure_writable_dir(path)
    except OSError as exc:
        raise CommandError(
            f"cannot write to {option} {path}: {exc.strerror or exc}; choose a writable directory"
        ) from exc


def _usage_from_validation(exc: ValidationError) -> UsageError:
    """pydantic's errors as one usage line naming the option of each bad field."""
    parts = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        parts.append(f"{'--' + field.replace('_', '-') if field else 'arguments'}: {err['msg']}")
    return UsageError("; ".join(parts))


def _fields_summary(exc: ValidationError) -> str:
    """pydantic's errors on one line, each as `dotted.field: message` (its own text spans lines and links)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else str(err["msg"]))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ commands


def _cmd_run(args: argparse.Namespace) -> int:
    from ocrbooth.config import load_settings
    from ocrbooth.daemon import eventloop
    from ocrbooth.daemon.app import Daemon
    from ocrbooth.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)
    daemon = Daemon(settings)
    return eventloop.run(daemon.run(until_idle=args.until_idle), settings.event_loop)


def _cmd_dev(args: argparse.Namespace) -> int:
    from ocrbooth.dev.run import run_dev
    from ocrbooth.logs import configure_logging

    if args.kafka_port and args.kafka_port == args.s3_port:
        raise UsageError(f"--kafka-port and --s3-port are both {args.kafka_port}; give them different ports")
    configure_logging("INFO", "console")
    return run_dev(
        args.data_dir,
        kafka_port=args.kafka_port or None,
        s3_port=args.s3_port or None,
        partitions=args.partitions,
        print_fn=lambda line: print(line, flush=True),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from ocrbooth.dev.demo import run_demo

    return run_demo(keep=args.keep)


def _cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ocrbooth.client.submit import submit, summarize
    from ocrbooth.config import load_settings
    from ocrbooth.schemas import OcrOptions

    try:
        options = OcrOptions(engine=args.engine, languages=args.languages, max_new_tokens=args.max_new_tokens)
    except ValidationError as exc:
        raise _usage_from_validation(exc) from None
    settings = load_settings(args.config)
    if args.out is not None:
        _make_output_dir(args.out, "--out")
    files = [(p.name, p.read_bytes()) for p in args.files]
    subs = asyncio.run(submit(settings, files, out_dir=args.out, timeout_s=args.timeout_s, options=options))
    return summarize(subs)


def _cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ocrbooth.models.dreambooth import TrainJob

    try:
        TrainJob.parse(args.job.read_bytes())
    except OcrboothError as exc:
        cause = exc.__cause__
        detail = f"invalid job file: {_fields_summary(cause)}" if isinstance(cause, ValidationError) else exc.message
        raise UsageError(f"{args.job}: {detail}") from None
    # Only now: the trainer imports torch and Lightning, seconds of work a malformed job need not wait for.
    from ocrbooth.models.dreambooth.train import main as train_main

    # The trainer's own codes tell the daemon whether a rerun can help; here every failure is just a failure.
    return EXIT_OK if train_main([str(args.job)]) == 0 else EXIT_FAILURE


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ocrbooth.client.submit import finetune_request, submit_finetune
    from ocrbooth.config import load_settings

    images = sorted(p for p in args.images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        raise UsageError(f"no images in {args.images_dir}: put 3-10 photos of the subject there")
    overrides = {
        k: v
        for k, v in {
            "max_train_steps": args.max_train_steps,
            "resolution": args.resolution,
            "num_class_images": args.num_class_images,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    settings = load_settings(args.config)
    request = {
        "instance_prompt": args.instance_prompt,
        "class_prompt": args.class_prompt,
        "base_model": args.base_model,
        "overrides": overrides,
    }
    try:
        finetune_request(settings, job_id="job-check", **request)
    except ValidationError as exc:
        raise _usage_from_validation(exc) from None
    events = asyncio.run(submit_finetune(settings, [(p.name, p.read_bytes()) for p in images], **request))
    last = events[-1].event if events else "timeout"
    return EXIT_OK if last == "completed" else EXIT_FAILURE


def _check_model_arg(model: str) -> None:
    """Refuse a local pipeline path that cannot be one before torch is imported (hub ids are checked later)."""
    if model.startswith("s3://"):
        return
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", "./", "../", "~")) or path.exists()
    if not looks_local:
        return
    if not path.is_dir():
        raise UsageError(f"--model: no such directory: {model}")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"--model: {model} is not a diffusers pipeline (no model_index.json)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from ocrbooth.config import load_settings

    _check_model_arg(args.model)
    settings = load_settings(args.config)
    if args.model.startswith("s3://"):
        from ocrbooth.client.submit import check_s3

        check_s3(settings)
    _make_output_dir(args.out, "--out")
    from ocrbooth.models.dreambooth.generate import generate

    paths = generate(
        args.model,
        args.prompt,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        num_images=args.num_images,
        seed=args.seed,
        out_dir=args.out,
        settings=settings,
    )
    for path in paths:
        print(path)
    return EXIT_OK


def _cmd_schemas(args: argparse.Namespace) -> int:
    from ocrbooth.schemas import write_json_schemas

    try:
        written = write_json_schemas(args.out)
    except OSError as exc:
        raise CommandError(
            f"cannot write schemas to {args.out}: {exc.strerror or exc}; choose a writable --out directory"
        ) from exc
    for path in written:
        print(path)
    return EXIT_OK


# -------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The `ocrbooth` parser; each subcommand's parser is kept in `args.parser` for its usage errors."""
    # SUPPRESS: a subcommand's default must not overwrite `ocrbooth --debug CMD`.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = argparse.ArgumentParser(prog="ocrbooth", description=__doc__, parents=[debug])
    parser.add_argument("--version", action="version", version=f"ocrbooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[debug])
        p.set_defaults(func=func, parser=p)
        return p

    run = command("run", _cmd_run, "run the daemon (settings from OCRBOOTH_* variables and --config)")
    run.add_argument("--config", type=Path, help="YAML settings file; environment variables override it")
    run.add_argument("--until-idle", action="store_true", help="exit once the input topics are drained")

    dev = command("dev", _cmd_dev, "run SeaweedFS and Tansu on 127.0.0.1 for development")
    dev.add_argument("--data-dir", type=_output_dir, default=Path(".ocrbooth/dev"), help="where both keep their data")
    dev.add_argument("--kafka-port", type=_port, default=9092, help="Kafka listener port (0: pick a free one)")
    dev.add_argument("--s3-port", type=_port, default=8333, help="S3 port (0: pick a free one)")
    dev.add_argument("--partitions", type=_positive_int, default=4, help="partitions of each input/output topic")

    demo = command("demo", _cmd_demo, "start the embedded stack and the daemon, push sample work, print results")
    demo.add_argument("--keep", action="store_true", help="keep the demo's data directory")

    submit = command("submit", _cmd_submit, "upload documents, publish requests, wait for and write the results")
    submit.add_argument("files", nargs="+", type=_input_file, help="PDF, PNG, JPEG, TIFF or WebP files")
    submit.add_argument("--out", type=_output_dir, help="write NAME.md and NAME.json here")
    submit.add_argument("--config", type=Path, help="YAML settings file (for topics, Kafka and S3)")
    submit.add_argument("--engine", choices=["auto", "lightonocr", "tesseract"], help="engine to ask for")
    submit.add_argument("--languages", type=_languages, help="comma-separated language codes, e.g. eng,fra")
    submit.add_argument("--max-new-tokens", type=_positive_int, help="output budget per page (lightonocr)")
    submit.add_argument("--timeout-s", type=_positive_float, default=600.0, help="how long to wait for all results")

    train = command("train", _cmd_train, "run one DreamBooth job (what the daemon runs as a subprocess)")
    train.add_argument("job", type=_input_file, help="JOB.json: a FinetuneRequest")

    finetune = command("finetune", _cmd_finetune, "upload subject photos, submit a DreamBooth job, follow it")
    finetune.add_argument("images_dir", type=_input_dir, help="folder with 3-10 photos of the subject")
    finetune.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog"')
    finetune.add_argument("--class-prompt", required=True, help='e.g. "a photo of dog"')
    finetune.add_argument("--base-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or path")
    finetune.add_argument("--max-train-steps", type=_positive_int)
    finetune.add_argument("--resolution", type=_positive_int, help="training image side in pixels (multiple of 8)")
    finetune.add_argument("--num-class-images", type=_positive_int)
    finetune.add_argument("--seed", type=_non_negative_int)
    finetune.add_argument("--config", type=Path, help="YAML settings file")

    generate = command("generate", _cmd_generate, "generate images with a trained result")
    generate.add_argument("--model", required=True, help="s3:// URI, path or cached hub id of a trained pipeline")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--guidance-scale", type=_non_negative_float, default=7.5)
    generate.add_argument("--num-inference-steps", type=_positive_int, default=30)
    generate.add_argument("--num-images", type=_positive_int, default=1)
    generate.add_argument("--seed", type=_non_negative_int, default=0)
    generate.add_argument("--out", type=_output_dir, required=True)
    generate.add_argument("--config", type=Path, help="YAML settings file")

    schemas = command("schemas", _cmd_schemas, "write one JSON Schema per wire model")
    schemas.add_argument("--out", type=_output_dir, required=True, help="output directory")
    return parser


# ------------------------------------------------------------------------------------- error mapping


def _one_line(text: str) -> str:
    """A multi-line message (ConfigError lists one problem per line) as one line."""
    head, *rest = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def _explain(exc: Exception) -> tuple[str, int] | None:
    """The line and exit status for an error a person can act on; None for a bug."""
    if isinstance(exc, CommandError):
        return str(exc), EXIT_FAILURE
    if isinstance(exc, ConfigError):
        return _one_line(exc.message) + " (fix the --config file or the OCRBOOTH_* variables)", EXIT_USAGE
    if isinstance(exc, OcrboothError):
        return _one_line(exc.message), EXIT_FAILURE
    # Types of libraries a command may not have imported: an exception of a type never loaded cannot occur.
    dev_errors = sys.modules.get("ocrbooth.dev.errors")
    if dev_errors is not None and isinstance(exc, dev_errors.EmbeddedStackError):
        return f"the embedded stack failed to start: {exc}", EXIT_FAILURE
    kafka_errors = sys.modules.get("aiokafka.errors")
    if kafka_errors is not None and isinstance(exc, kafka_errors.KafkaError):
        return f"Kafka failed: {exc}; check that the broker is up and OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS", EXIT_FAILURE
    boto_errors = sys.modules.get("botocore.exceptions")
    if boto_errors is not None and isinstance(exc, boto_errors.BotoCoreError | boto_errors.ClientError):
        return f"S3 failed: {exc}; check OCRBOOTH_S3_ENDPOINT_URL and the AWS_* variables", EXIT_FAILURE
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILURE
    return None


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("OCRBOOTH_LOG_LEVEL", "").upper() == "DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Parse, run the subcommand, and turn every error into one line and an exit status."""
    args = build_parser().parse_args(argv)
    debug = _debug_requested(args)
    try:
        code: Any = args.func(args)
        return int(code)
    except UsageError as exc:
        args.parser.error(str(exc))  # exits 2 after the usage line, as argparse does for its own errors
    except KeyboardInterrupt:
        print("ocrbooth: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place errors become output; anything unexplained is a bug
        if debug:
            traceback.print_exc()
        explained = _explain(exc)
        if explained is not None:
            message, status = explained
            print(f"ocrbooth: {message}", file=sys.stderr)
            return status
        print(
            f"ocrbooth: internal error: {type(exc).__name__}: {_one_line(str(exc))}"
            + ("" if debug else " (rerun with --debug for the traceback, and report it)"),
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_USAGE  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
