"""Where the trainer's data comes from and in which order it is seen.

- `S3Objects`: blocking S3 calls (the trainer is a plain sync process) with the daemon's error classification.
- `resolve_model_dir`: a base model given as local path, `s3://` prefix or hub id, as a local directory.
- `fetch_instance_images`: the subject photos, with every bound checked before any GPU work.
- `image_to_tensor`: resize + crop + scale to [-1, 1].
- `StepSampler` / `LatentPairs`: a deterministic example order that a resumed run can continue exactly.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from ocrbooth.config import Settings
from ocrbooth.errors import PoisonError, RetryableError
from ocrbooth.storage import parse_s3_uri, s3_call, s3_client

log = logging.getLogger(__name__)

_COMPLETE_FILE = ".complete"  # local marker of a fully downloaded model directory


@dataclass(frozen=True)
class S3Object:
    """One listed object: where it is and how big it is."""

    bucket: str
    key: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class S3Objects:
    """Blocking S3 access for the trainer: missing objects are PoisonError(source_not_found), denied ones
    PoisonError(source_forbidden), everything else RetryableError (a crash exit; the rerun resumes)."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.bucket = settings.s3.bucket
        self.client: Any = client or s3_client(settings.s3, max_attempts=5)

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    def list_objects(self, bucket: str, prefix: str) -> list[S3Object]:
        """Every object under `prefix` (recursively), sorted by key; "folder" placeholders are skipped."""
        out: list[S3Object] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            out += [
                S3Object(bucket, item["Key"], int(item.get("Size", 0)))
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            ]
            if not page.get("IsTruncated"):
                return sorted(out, key=lambda o: o.key)
            token = page.get("NextContinuationToken")

    def head(self, bucket: str, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        try:
            return int(self._call("head_object", Bucket=bucket, Key=key)["ContentLength"])
        except PoisonError as exc:
            if exc.code == "source_not_found":
                return None
            raise

    def get(self, bucket: str, key: str) -> bytes:
        body = self._call("get_object", Bucket=bucket, Key=key)["Body"]
        data: bytes = body.read()
        return data

    def put(self, key: str, data: bytes, *, bucket: str | None = None) -> str:
        """Write one object (in the configured bucket unless told otherwise); return its URI."""
        self._call("put_object", Bucket=bucket or self.bucket, Key=key, Body=data)
        return self.uri(key, bucket)

    def upload_file(self, path: Path, bucket: str, key: str) -> str:
        """Upload one local file (multipart when large); return its URI."""
        self._call("upload_file", Filename=str(path), Bucket=bucket, Key=key)
        return self.uri(key, bucket)

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> list[str]:
        """Upload every file under `local` to `prefix` + its relative path; return the keys (sorted)."""
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(local).as_posix()
            self.upload_file(path, bucket, key)
            keys.append(key)
        return keys

    def download_prefix(self, bucket: str, prefix: str, local: Path) -> list[Path]:
        """Download every object under `prefix` into `local`, keeping the relative layout."""
        paths = []
        for obj in self.list_objects(bucket, prefix):
            rel = obj.key[len(prefix) :]
            if not rel or ".." in Path(rel).parts:
                continue
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            self._call("download_file", Bucket=bucket, Key=obj.key, Filename=str(path))
            paths.append(path)
        return paths

    def delete(self, bucket: str, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys per request
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            result = self._call("delete_objects", Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            if result.get("Errors"):
                raise RetryableError(f"S3 delete failed: {result['Errors'][:3]}", code="storage_unavailable")

    def _call(self, op: str, **kwargs: Any) -> Any:
        return s3_call(self.client, op, **kwargs)


# ---- base models -------------------------------------------------------------------------------------------


def resolve_model_dir(model: str, settings: Settings, s3: S3Objects) -> Path:
    """A local diffusers pipeline directory for `model` (local path, `s3://` prefix or hub id).

    S3 prefixes are downloaded once into `{workdir}/models/`; hub ids come from the local Hugging Face cache
    only (`local_files_only`), so an unreachable hub fails at once instead of hanging. Raises
    PoisonError(unknown_base_model) when nothing loadable is found."""
    if model.startswith("s3://"):
        bucket, key = parse_s3_uri(model)
        if bucket not in settings.s3.readable_buckets() | {settings.s3.bucket}:  # our own outputs are fine
            raise PoisonError(f"base model bucket {bucket!r} is not allowed", code="source_not_allowed")
        prefix = key if key.endswith("/") else key + "/"
        local = settings.finetune.workdir / "models" / hashlib.sha256(model.encode()).hexdigest()[:32]
        if not (local / _COMPLETE_FILE).is_file():
            shutil.rmtree(local, ignore_errors=True)
            if not s3.download_prefix(bucket, prefix, local):
                raise PoisonError(f"no base model under {model}", code="unknown_base_model")
            (local / _COMPLETE_FILE).touch()
        path = local
    elif Path(model).expanduser().exists():
        path = Path(model).expanduser()
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model, local_files_only=True))
        except Exception as exc:  # the hub raises a zoo of types (bad id, not cached, offline)
            raise PoisonError(
                f"base model {model!r} is neither a local path nor in the local hub cache: {exc}",
                code="unknown_base_model",
            ) from exc
    if not (path / "model_index.json").is_file():
        raise PoisonError(
            f"base model {model!r} is not a diffusers pipeline (no model_index.json)", code="unknown_base_model"
        )
    return path


# ---- instance images -----------------------------------------------------------------------------------


def list_instance_images(uris: Sequence[str], settings: Settings, s3: S3Objects) -> list[S3Object]:
    """The instance image objects: the URIs themselves, or everything under a single prefix URI."""
    readable = settings.s3.readable_buckets()
    found: list[S3Object] = []
    for uri in uris:
        bucket, key = parse_s3_uri(uri)
        if bucket not in readable:
            raise PoisonError(f"{uri}: bucket {bucket!r} is not allowed", code="source_not_allowed")
        size = None if key.endswith("/") else s3.head(bucket, key)
        if size is not None:
            found.append(S3Object(bucket, key, size))
        elif len(uris) == 1:  # one URI that is no object: a prefix
            found += s3.list_objects(bucket, key if key.endswith("/") else key + "/")
        else:
            raise PoisonError(f"instance image {uri} does not exist", code="source_not_found")
    if not found:
        raise PoisonError(f"no instance images at {', '.join(uris)}", code="no_instance_images")
    limit = settings.finetune.max_instance_images
    if len(found) > limit:
        raise PoisonError(f"{len(found)} instance images, over the limit of {limit}", code="too_many_images")
    for obj in found:
        if obj.size > settings.finetune.max_image_bytes:
            raise PoisonError(
                f"{obj.uri} is {obj.size} bytes, over {settings.finetune.max_image_bytes}", code="image_too_large"
            )
    return found


def decode_image(data: bytes, where: str) -> Image.Image:
    """An RGB image, upright per its EXIF orientation; PoisonError(invalid_image / image_too_large) otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PoisonError(f"{where}: {exc}", code="image_too_large") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PoisonError(f"{where} is not a readable image: {exc}", code="invalid_image") from exc
    return ImageOps.exif_transpose(image).convert("RGB")


def fetch_instance_images(uris: Sequence[str], settings: Settings, s3: S3Objects) -> list[Image.Image]:
    """List, size-check, download and decode the instance images."""
    images = []
    for obj in list_instance_images(uris, settings, s3):
        images.append(decode_image(s3.get(obj.bucket, obj.key), obj.uri))
    log.info("instance images fetched", extra={"count": len(images)})
    return images


def image_to_tensor(image: Image.Image, resolution: int, *, center_crop: bool, rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (centre or random), scale to [-1, 1]; 3 x R x R."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---- example order -----------------------------------------------------------------------------------------


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of epoch `epoch`: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(i) for i in torch.randperm(length, generator=generator)]


@dataclass(frozen=True)
class DataState:
    """How far through the example stream training is; all that a resumed run needs to continue it."""

    consumed_examples: int
    """Examples drawn so far, over every rank."""
    length: int
    """Examples per epoch."""

    @property
    def epoch(self) -> int:
        return self.consumed_examples // self.length

    @property
    def index_in_epoch(self) -> int:
        return self.consumed_examples % self.length

    def to_json(self) -> dict[str, int]:
        return {
            "consumed_examples": self.consumed_examples,
            "length": self.length,
            "epoch": self.epoch,
            "index_in_epoch": self.index_in_epoch,
        }


class StepSampler(Sampler[int]):
    """`count` micro-batches of `batch_size` indices for this rank, continuing the stream at `start`.

    The stream is the concatenation of `epoch_order(length, seed, e)` for e = 0, 1, ...; global micro-batch m
    takes positions [m*B*W, (m+1)*B*W), and rank r the r-th block of B of them. So the order is a function of
    (seed, position) alone: a run resumed at position p draws exactly what an uninterrupted one would."""

    def __init__(
        self, length: int, seed: int, *, start: int, count: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.length, self.seed, self.start, self.count = length, seed, start, count
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self._orders: dict[int, list[int]] = {}

    def _at(self, position: int) -> int:
        epoch, index = divmod(position, self.length)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.length, self.seed, epoch)}  # only the current epoch is kept
        return self._orders[epoch][index]

    def __iter__(self) -> Iterator[int]:
        per_step = self.batch_size * self.world_size
        for m in range(self.count):
            base = self.start + m * per_step + self.rank * self.batch_size
            for j in range(self.batch_size):
                yield self._at(base + j)

    def __len__(self) -> int:
        return self.count * self.batch_size


class LatentPairs(Dataset[dict[str, torch.Tensor]]):
    """Precomputed VAE latent distributions (mean, std): example i is instance i mod N, paired with class
    image i mod M under prior preservation (as the DreamBooth reference script pairs them)."""

    def __init__(
        self,
        instance: tuple[torch.Tensor, torch.Tensor],
        class_: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        self.instance = instance
        self.class_ = class_

    def __len__(self) -> int:
        n = len(self.instance[0])
        return max(n, len(self.class_[0])) if self.class_ is not None else n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.instance[0])
        item = {"instance_mean": self.instance[0][index % n], "instance_std": self.instance[1][index % n]}
        if self.class_ is not None:
            m = len(self.class_[0])
            item |= {"class_mean": self.class_[0][index % m], "class_std": self.class_[1][index % m]}
        return item
