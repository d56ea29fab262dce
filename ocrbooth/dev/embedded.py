"""The embedded development stack: SeaweedFS (S3) and Tansu (Kafka protocol) as local child processes.

`ocrbooth dev` and the integration tests use it. Everything binds 127.0.0.1. With the default
``storage="s3"`` Tansu keeps its log in a SeaweedFS bucket, so the broker can be killed and restarted
without losing topics, records or committed offsets. Its parts sit next to this file: `ports.py` (free
ports and the ports file), `processes.py` (the children and their binaries), `topics.py` (Kafka admin
helpers); `run.py` is `ocrbooth dev`.

Two quirks of the bundled Tansu build shape the helpers of this package and the tests:
- with the s3 storage engine ListOffsets(latest) is wrong, so ``end_offsets()``/``seek_to_end()`` must
  not be trusted; the high watermark of a fetch response is right.
- InitProducerId is refused, so producers must run with ``enable_idempotence=False``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

from ocrbooth.dev.errors import EmbeddedStackError
from ocrbooth.dev.ports import HOST, StackPorts, _load_ports, _port_is_free, _save_ports, _tcp_open
from ocrbooth.dev.processes import _child_env, _log_tail, _start_child, _stop_child, tansu_binary, weed_binary
from ocrbooth.dev.topics import default_topics, ensure_topics, kafka_metadata_ok, run_sync

logger = logging.getLogger(__name__)

_S3_PROBE_KEY: Final = ".ocrbooth-embedded/ready-probe"  # written, read back and deleted at start
_POLL_INTERVAL_S: Final = 0.1


class EmbeddedStack:
    """SeaweedFS and Tansu as child processes on 127.0.0.1, with Tansu's log stored in SeaweedFS.

    `start()` returns once S3 answers, both buckets exist, the broker answers metadata requests and the
    topics exist. `stop()` (also on `__exit__`, at interpreter exit, and when the process dies on Linux)
    stops the broker first, then S3.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        bucket: str = "ocrbooth",
        log_bucket: str = "tansu",
        kafka_port: int | None = None,
        s3_port: int | None = None,
        storage: Literal["s3", "memory"] = "s3",
        access_key: str = "ocrbooth",
        secret_key: str = "ocrbooth-secret",  # noqa: S107  # credential of a local throwaway server
        region: str = "us-east-1",
        topics: Mapping[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.log_bucket = log_bucket
        self.storage = storage
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.topics: dict[str, int] = dict(default_topics() if topics is None else topics)
        self._kafka_port = kafka_port
        self._s3_port = s3_port
        self._ports: StackPorts | None = None
        self._weed: subprocess.Popen[bytes] | None = None
        self._tansu: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ addresses

    @property
    def ports(self) -> StackPorts:
        """The ports in use; known once `start()` has begun."""
        if self._ports is None:
            raise EmbeddedStackError("the stack has not been started")
        return self._ports

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap address, e.g. ``127.0.0.1:9092``."""
        return f"{HOST}:{self.ports.kafka}"

    @property
    def s3_endpoint_url(self) -> str:
        """S3 endpoint, e.g. ``http://127.0.0.1:8333``."""
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def weed_log(self) -> Path:
        """Where SeaweedFS writes its output."""
        return self.data_dir / "weed.log"

    @property
    def tansu_log(self) -> Path:
        """Where Tansu writes its output (appended across broker restarts)."""
        return self.data_dir / "tansu.log"

    @property
    def running(self) -> bool:
        """Whether both child processes are alive."""
        return all(p is not None and p.poll() is None for p in (self._weed, self._tansu))

    @property
    def broker_running(self) -> bool:
        """Whether the broker process is alive."""
        return self._tansu is not None and self._tansu.poll() is None

    def env(self) -> dict[str, str]:
        """The environment a daemon (or `ocrbooth submit`) needs to use this stack."""
        return {
            "OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "OCRBOOTH_KAFKA_ENABLE_IDEMPOTENCE": "false",
            "OCRBOOTH_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "OCRBOOTH_S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def s3_client(self, *, timeout_s: float = 10.0) -> Any:
        """A boto3 S3 client for this stack (path-style addressing, explicit credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": 1 if timeout_s < 5 else 3, "mode": "standard"},
            ),
        )

    def create_topics(self, topics: Mapping[str, int]) -> None:
        """Create topics (name -> partitions) if missing; callable from inside a running event loop."""
        bootstrap = self.bootstrap_servers
        run_sync(lambda: ensure_topics(bootstrap, topics))

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 60) -> None:
        """Start S3, then the broker; return when both are ready and the topics exist."""
        with self._lock:
            if self.running:
                return
            deadline = time.monotonic() + timeout_s
            started = False
            try:
                self._start_weed(deadline)
                self._start_tansu(deadline)
                if self.topics:
                    self.create_topics(self.topics)
                started = True
            finally:
                if not started:
                    self.stop()
            logger.info(
                "embedded stack ready: kafka %s, s3 %s (%s storage, data in %s)",
                self.bootstrap_servers,
                self.s3_endpoint_url,
                self.storage,
                self.data_dir,
            )

    def stop(self) -> None:
        """Stop the broker, then S3 (SIGTERM, then SIGKILL past a deadline). Idempotent."""
        with self._lock:
            self.stop_broker()
            if self._weed is not None:
                _stop_child(self._weed, "weed")
                self._weed = None
                self._remove_weed_sockets()

    def kill(self) -> None:
        """SIGKILL both children now, without waiting for a graceful stop."""
        for proc in (self._tansu, self._weed):
            if proc is not None and proc.poll() is None:
                proc.kill()
        self.stop()

    def stop_broker(self) -> None:
        """Stop only the broker (for outage tests); `start_broker()` brings it back on the same port."""
        with self._lock:
            if self._tansu is not None:
                _stop_child(self._tansu, "tansu")
                self._tansu = None

    def start_broker(self, timeout_s: float = 30) -> None:
        """Start the broker again on the same port and wait until it answers metadata requests."""
        with self._lock:
            if self._weed is None or self._weed.poll() is not None:
                raise EmbeddedStackError("S3 is not running; call start()")
            if self.broker_running:
                return
            self._start_tansu(time.monotonic() + timeout_s)

    def restart_broker(self, timeout_s: float = 30) -> None:
        """Stop and start the broker."""
        with self._lock:
            self.stop_broker()
            self.start_broker(timeout_s)

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _start_weed(self, deadline: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = _load_ports(self.data_dir, kafka=self._kafka_port, s3=self._s3_port)
        for name, port in (("kafka", self._kafka_port), ("s3", self._s3_port)):
            if port is not None and not _port_is_free(port):
                raise EmbeddedStackError(f"{name} port {port} on {HOST} is already in use")
        self._ports = ports
        _save_ports(self.data_dir, ports)
        buckets = [self.bucket] + ([self.log_bucket] if self.storage == "s3" else [])
        argv = [
            weed_binary(),
            "-logtostderr",  # into weed.log, not glog files in the temp dir
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-bucket={','.join(buckets)}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3_grpc}",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master_grpc}",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume_grpc}",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer_grpc}",
            f"-admin.port={ports.admin}",
            f"-admin.port.grpc={ports.admin_grpc}",
        ]
        env = _child_env({"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key})
        logger.debug("starting %s", shlex.join(argv))
        self._weed = _start_child(argv, env=env, cwd=self.data_dir, log_path=self.weed_log)
        self._wait_s3(deadline)
        self._ensure_buckets(buckets)

    def _wait_s3(self, deadline: float) -> None:
        """Poll until an object round trip works, not just a bucket lookup.

        After a restart weed answers bucket requests before the volume server has re-registered its
        volumes with the master; until then every object read fails ("volume N not found"), which
        would stall the broker's first reads of its log.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self.s3_client(timeout_s=2.0)
        last: Exception | None = None
        try:
            while True:
                self._check_alive(self._weed, "weed", self.weed_log)
                try:
                    s3.put_object(Bucket=self.bucket, Key=_S3_PROBE_KEY, Body=b"ready")
                    body = s3.get_object(Bucket=self.bucket, Key=_S3_PROBE_KEY)["Body"].read()
                    s3.delete_object(Bucket=self.bucket, Key=_S3_PROBE_KEY)
                    if body == b"ready":
                        return
                except (BotoCoreError, ClientError) as exc:
                    last = exc
                if time.monotonic() > deadline:
                    raise EmbeddedStackError(
                        f"S3 at {self.s3_endpoint_url} not ready in time (last error: {last});"
                        f" log tail:\n{_log_tail(self.weed_log)}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            s3.close()

    def _ensure_buckets(self, buckets: list[str]) -> None:
        from botocore.exceptions import ClientError

        s3 = self.s3_client()
        try:
            for bucket in buckets:
                try:
                    s3.create_bucket(Bucket=bucket)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in (
                        "BucketAlreadyOwnedByYou",
                        "BucketAlreadyExists",
                    ):
                        raise
        finally:
            s3.close()

    def _start_tansu(self, deadline: float) -> None:
        ports = self.ports
        if not _port_is_free(ports.kafka):
            raise EmbeddedStackError(f"kafka port {ports.kafka} on {HOST} is already in use")
        listener = f"tcp://{HOST}:{ports.kafka}"
        engine = f"s3://{self.log_bucket}/" if self.storage == "s3" else "memory://tansu/"
        argv = [
            tansu_binary(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            engine,
        ]
        env = _child_env(
            {
                "AWS_ENDPOINT": self.s3_endpoint_url,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_ALLOW_HTTP": "true",
            }
        )
        logger.debug("starting %s", shlex.join(argv))
        self._tansu = _start_child(argv, env=env, cwd=self.data_dir, log_path=self.tansu_log)
        self._wait_kafka(deadline)

    def _wait_kafka(self, deadline: float) -> None:
        bootstrap = self.bootstrap_servers
        while True:
            self._check_alive(self._tansu, "tansu", self.tansu_log)
            if _tcp_open(HOST, self.ports.kafka) and run_sync(lambda: kafka_metadata_ok(bootstrap)):
                return
            if time.monotonic() > deadline:
                raise EmbeddedStackError(
                    f"broker at {bootstrap} not ready in time; log tail:\n{_log_tail(self.tansu_log)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    @staticmethod
    def _check_alive(proc: subprocess.Popen[bytes] | None, name: str, log: Path) -> None:
        if proc is None:
            raise EmbeddedStackError(f"{name} was stopped during startup")
        code = proc.poll()
        if code is not None:
            raise EmbeddedStackError(f"{name} exited with status {code}; log tail:\n{_log_tail(log)}")

    def _remove_weed_sockets(self) -> None:
        # weed leaves one unix socket per listener in the temp dir, named after the port.
        if self._ports is None:
            return
        p = self._ports
        names = [
            f"seaweedfs-admin-grpc-{p.admin_grpc}.sock",
            f"seaweedfs-filer-{p.filer}.sock",
            f"seaweedfs-filer-grpc-{p.filer_grpc}.sock",
            f"seaweedfs-master-grpc-{p.master_grpc}.sock",
            f"seaweedfs-s3-{p.s3}.sock",
            f"seaweedfs-s3-grpc-{p.s3_grpc}.sock",
            f"seaweedfs-volume-grpc-{p.volume_grpc}.sock",
        ]
        tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
        for name in names:
            with contextlib.suppress(OSError):
                path = tmp / name
                if path.is_socket():
                    path.unlink()
