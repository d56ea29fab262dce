"""Regenerate the checked-in JSON Schemas: `python -m ocrbooth.schemas [OUT_DIR]`."""

import sys
from pathlib import Path

from ocrbooth.schemas.registry import SCHEMA_DIR, write_json_schemas


def main(argv: list[str]) -> int:
    """Write every model's schema into OUT_DIR (default: the package's `json/`) and list the files."""
    out_dir = Path(argv[0]) if argv else SCHEMA_DIR
    for path in write_json_schemas(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
