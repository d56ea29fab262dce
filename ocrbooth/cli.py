"""`ocrbooth` command line: run, dev, demo, schemas."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ocrbooth import __version__
from ocrbooth.errors import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from ocrbooth.daemon.app import Daemon
    from ocrbooth.daemon.config import load_settings
    from ocrbooth.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.log.level, settings.log.format)
    daemon = Daemon(settings)
    return asyncio.run(daemon.run(until_idle=args.until_idle))


def _cmd_dev(args: argparse.Namespace) -> int:
    from ocrbooth.daemon.embedded import run_dev
    from ocrbooth.logs import configure_logging

    configure_logging("INFO", "console")
    return run_dev(
        args.data_dir,
        kafka_port=args.kafka_port or None,
        s3_port=args.s3_port or None,
        partitions=args.partitions,
        print_fn=lambda line: print(line, flush=True),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from ocrbooth.demo import run_demo

    return run_demo(keep=args.keep)


def _cmd_submit(args: argparse.Namespace) -> int:
    from ocrbooth.daemon.config import load_settings
    from ocrbooth.schemas import OcrOptions
    from ocrbooth.submit import submit, summarize

    settings = load_settings(args.config)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"ocrbooth: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    options = OcrOptions(
        engine=args.engine,
        languages=args.languages.split(",") if args.languages else None,
        max_new_tokens=args.max_new_tokens,
    )
    files = [(p.name, p.read_bytes()) for p in args.files]
    subs = asyncio.run(submit(settings, files, out_dir=args.out, timeout_s=args.timeout_s, options=options))
    return summarize(subs)


def _cmd_train(args: argparse.Namespace) -> int:
    from ocrbooth.models.dreambooth.train import main as train_main

    return train_main([str(args.job)])


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ocrbooth.daemon.config import load_settings
    from ocrbooth.submit import submit_finetune

    settings = load_settings(args.config)
    images = sorted(p for p in args.images_dir.iterdir() if p.is_file()) if args.images_dir.is_dir() else []
    if not images:
        print(f"ocrbooth: no images in {args.images_dir}", file=sys.stderr)
        return 2
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
    events = asyncio.run(
        submit_finetune(
            settings,
            [(p.name, p.read_bytes()) for p in images],
            instance_prompt=args.instance_prompt,
            class_prompt=args.class_prompt,
            base_model=args.base_model,
            overrides=overrides,
        )
    )
    last = events[-1].event if events else "timeout"
    return 0 if last == "completed" else 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from ocrbooth.daemon.config import load_settings
    from ocrbooth.models.dreambooth.generate import generate

    settings = load_settings(args.config)
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
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from ocrbooth.schemas import write_json_schemas

    for path in write_json_schemas(args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocrbooth", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ocrbooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon (settings from OCRBOOTH_* variables and --config)")
    run.add_argument("--config", type=Path, help="YAML settings file; environment variables override it")
    run.add_argument("--until-idle", action="store_true", help="exit once the input topics are drained")
    run.set_defaults(func=_cmd_run)

    dev = sub.add_parser("dev", help="run SeaweedFS and Tansu on 127.0.0.1 for development")
    dev.add_argument("--data-dir", type=Path, default=Path(".ocrbooth/dev"), help="where both keep their data")
    dev.add_argument("--kafka-port", type=int, default=9092, help="Kafka listener port (0: pick a free one)")
    dev.add_argument("--s3-port", type=int, default=8333, help="S3 port (0: pick a free one)")
    dev.add_argument("--partitions", type=int, default=4, help="partitions of each input/output topic")
    dev.set_defaults(func=_cmd_dev)

    demo = sub.add_parser("demo", help="start the embedded stack and the daemon, push sample work, print results")
    demo.add_argument("--keep", action="store_true", help="keep the demo's data directory")
    demo.set_defaults(func=_cmd_demo)

    submit = sub.add_parser("submit", help="upload documents, publish requests, wait for and write the results")
    submit.add_argument("files", nargs="+", type=Path, help="PDF, PNG, JPEG, TIFF or WebP files")
    submit.add_argument("--out", type=Path, help="write NAME.md and NAME.json here")
    submit.add_argument("--config", type=Path, help="YAML settings file (for topics, Kafka and S3)")
    submit.add_argument("--engine", choices=["auto", "lightonocr", "tesseract"], help="engine to ask for")
    submit.add_argument("--languages", help="comma-separated language codes, e.g. eng,fra")
    submit.add_argument("--max-new-tokens", type=int, help="output budget per page (lightonocr)")
    submit.add_argument("--timeout-s", type=float, default=600.0, help="how long to wait for all results")
    submit.set_defaults(func=_cmd_submit)

    train = sub.add_parser("train", help="run one DreamBooth job (what the daemon runs as a subprocess)")
    train.add_argument("job", type=Path, help="JOB.json: a FinetuneRequest")
    train.set_defaults(func=_cmd_train)

    finetune = sub.add_parser("finetune", help="upload subject photos, submit a DreamBooth job, follow it")
    finetune.add_argument("images_dir", type=Path, help="folder with 3-10 photos of the subject")
    finetune.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog"')
    finetune.add_argument("--class-prompt", required=True, help='e.g. "a photo of dog"')
    finetune.add_argument("--base-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or path")
    finetune.add_argument("--max-train-steps", type=int)
    finetune.add_argument("--resolution", type=int)
    finetune.add_argument("--num-class-images", type=int)
    finetune.add_argument("--seed", type=int)
    finetune.add_argument("--config", type=Path, help="YAML settings file")
    finetune.set_defaults(func=_cmd_finetune)

    generate = sub.add_parser("generate", help="generate images with a trained result")
    generate.add_argument("--model", required=True, help="s3:// URI or path of a trained pipeline")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--guidance-scale", type=float, default=7.5)
    generate.add_argument("--num-inference-steps", type=int, default=30)
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", type=Path, required=True)
    generate.add_argument("--config", type=Path, help="YAML settings file")
    generate.set_defaults(func=_cmd_generate)

    schemas = sub.add_parser("schemas", help="write one JSON Schema per wire model")
    schemas.add_argument("--out", type=Path, required=True, help="output directory")
    schemas.set_defaults(func=_cmd_schemas)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:  # every command reports invalid settings the same way
        print(f"ocrbooth: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
