"""Regenerate the checked-in JSON Schemas: `python -m ocrbooth.schemas [OUT_DIR]`."""

import sys
from pathlib import Path

from ocrbooth.schemas.registry import SCHEMA_DIR, write_json_schemas


def main(argv: list[str]) -> int:
    """Write every model's schema into OUT_DIR (default: the package's `json/`) and list the files.
    Exit status 2 for a bad command line, 1 when the files cannot be written (one line on stderr)."""
    usage = "usage: python -m ocrbooth.schemas [OUT_DIR]"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(usage, file=sys.stderr)
        return 2
    out_dir = Path(argv[0]) if argv else SCHEMA_DIR
    if out_dir.exists() and not out_dir.is_dir():
        print(f"ocrbooth.schemas: {out_dir} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        written = write_json_schemas(out_dir)
    except OSError as exc:
        print(f"ocrbooth.schemas: cannot write to {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
