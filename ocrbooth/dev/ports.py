"""Where the embedded stack listens: free TCP ports on 127.0.0.1, and the ports file that keeps them
across runs of one data dir."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
# weed dials the admin gRPC server at admin.port + 10000 whatever admin.port.grpc says; matching them
# keeps its log free of reconnect noise.
_WEED_GRPC_OFFSET: Final = 10000
_PORTS_FILE: Final = "ports.json"


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


def _save_ports(data_dir: Path, ports: StackPorts) -> None:
    """Record `ports` in `data_dir` for `_load_ports` to reuse on the next run."""
    (data_dir / _PORTS_FILE).write_text(json.dumps(asdict(ports), indent=2) + "\n")


def _tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
