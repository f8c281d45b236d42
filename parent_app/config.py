"""The parent's configuration (JSON). The parent is untrusted, so nothing here can weaken the enclave:
it only says where to listen, where things are, how many connections to relay and how to start the
enclave. It holds no TLS material: TLS ends inside the enclave, and the public listener is a layer-4
relay of ciphertext. Unknown keys and bad values are rejected with :class:`ConfigError`.

Example (local stack)::

    {"listen": "127.0.0.1:50051", "health_listen": "127.0.0.1:8080",
     "region": "us-east-1", "run_dir": "/tmp/nv/parent",
     "credentials": {"kind": "static", "file": "creds.json"},
     "models": {"kind": "directory", "path": "models"},
     "kms_proxy_target": "tcp:127.0.0.1:4566",
     "enclave": {"kind": "process", "argv": ["python", "-m", "..."]}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nitrovault.errors import ConfigError
from nitrovault.transport import TcpAddress, parse_address


def host_port(value: object, key: str) -> TcpAddress:
    """``"HOST:PORT"`` (``"[::]:443"`` for IPv6) as a :class:`TcpAddress`, or :class:`ConfigError`."""
    if not isinstance(value, str) or not value or value.startswith(("tcp:", "unix:", "vsock:")):
        raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    try:
        address = parse_address(f"tcp:{value}")
    except ConfigError as err:
        raise ConfigError(f"{key} must be HOST:PORT ({err})") from None
    if not isinstance(address, TcpAddress):  # parse_address("tcp:...") only makes TcpAddress
        raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
    return address


#: enclaves one parent runs at most (nitro-cli allows several per instance; each needs its own vCPUs)
MAX_ENCLAVES = 16

#: keys that must be positive integers
_COUNTS = ("audit_max_bytes", "max_connections", "max_connections_per_source", "connection_burst_per_source")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _require(key: str, value: object, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"parent config {key} must be {what}, got {value!r}")


@dataclass(frozen=True)
class ParentConfig:
    #: the public TCP listener, "HOST:PORT": a layer-4 relay to vsock(enclave_cid, inference_port), where
    #: the enclave terminates TLS (the relay only checks TLS record headers until the handshake ends)
    listen: str
    #: AWS region (for credentials and the KMS endpoint)
    region: str
    #: folder for the parent's unix sockets and status file
    run_dir: str
    #: ``{"kind": "static", "file": PATH}`` or ``{"kind": "imds"}``
    credentials: Mapping[str, Any]
    #: ``{"kind": "directory", "path": DIR}`` or ``{"kind": "s3", "bucket": B, "prefix": P}``
    models: Mapping[str, Any]
    #: ``{"kind": "process", "argv": [...]}`` or
    #: ``{"kind": "nitro-cli", "eif": PATH, "cpu_count": N, "memory_mib": M}``; either may add
    #: ``"count": N`` (enclaves on this parent, CIDs ``enclave_cid`` .. ``enclave_cid + N - 1``;
    #: ``cpu_count`` and ``memory_mib`` are per enclave)
    enclave: Mapping[str, Any]
    #: where the local KMS proxy relays vsock(3, kms_proxy) to; empty in production (vsock-proxy does it)
    kms_proxy_target: str = ""
    #: where the local state-store proxy relays vsock(3, state_store_proxy_port) to (the store's TLS port);
    #: empty in production (a second vsock-proxy, allowlisting only the store's endpoint, does it)
    state_store_proxy_target: str = ""
    state_store_proxy_port: int = 8002
    enclave_cid: int = 16
    inference_port: int = 5000
    host_services_port: int = 8001
    kms_proxy_port: int = 8000
    #: connections relayed at once on ``listen``; beyond it a new connection is closed at once
    max_connections: int = 1024
    #: connections relayed at once from one client IP (an IPv6 /64)
    max_connections_per_source: int = 64
    #: new connections a second one client IP may open (a token bucket) ...
    connection_rate_per_source: float = 50.0
    #: ... and how many it may open in a burst
    connection_burst_per_source: int = 100
    #: seconds without a byte in either direction before a relayed connection is closed
    idle_timeout_s: float = 300.0
    #: seconds a client has to finish its TLS handshake (send its first application_data record)
    handshake_timeout_s: float = 10.0
    #: bytes of TLS records a client may send before its first application_data record
    max_handshake_bytes: int = 64 * 1024
    #: the load balancer's HTTP health endpoint, "HOST:PORT" (``GET /health``); empty: none
    health_listen: str = ""
    #: the Prometheus endpoint, "HOST:PORT" (``GET /metrics``: the parent's and the enclaves' aggregate
    #: metrics, never a subject, input or output); empty: none. Bind it to loopback: the CloudWatch agent
    #: on the instance scrapes it.
    metrics_listen: str = ""
    #: seconds a drain (SIGTERM) gives in-flight calls and the enclaves' final audit checkpoints before
    #: the enclaves are stopped
    drain_timeout_s: float = 30.0
    #: seconds an enclave must stay up before its restart backoff resets
    stable_after_s: float = 60.0
    #: where the enclave's audit log is stored, one folder per enclave boot; empty: ``RUN_DIR/audit``
    audit_dir: str = ""
    #: an audit file is rotated past this size, in bytes
    audit_max_bytes: int = 10 << 20
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> ParentConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read parent config {path}: {err}") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict):
            raise ConfigError("parent config must be a JSON object")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown parent config key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"parent config: {err}") from None

    def __post_init__(self) -> None:
        for key in _COUNTS:
            _require(key, getattr(self, key), _is_positive_int(getattr(self, key)), "a positive integer")
        _require(
            "max_handshake_bytes",
            self.max_handshake_bytes,
            _is_positive_int(self.max_handshake_bytes) and self.max_handshake_bytes >= 1024,
            "an integer of at least 1024",
        )
        for key in ("connection_rate_per_source", "idle_timeout_s", "handshake_timeout_s", "drain_timeout_s"):
            _require(key, getattr(self, key), _is_positive_number(getattr(self, key)), "a positive number")
        if self.max_connections_per_source > self.max_connections:
            raise ConfigError("max_connections_per_source must not exceed max_connections")
        count = self.enclave.get("count", 1)
        _require("enclave.count", count, _is_positive_int(count) and count <= MAX_ENCLAVES,
                 f"an integer in 1..{MAX_ENCLAVES}")
        _require("enclave_cid", self.enclave_cid,
                 _is_positive_int(self.enclave_cid) and 4 <= self.enclave_cid < 2**32 - count,
                 "a vsock CID >= 4 (0-3 are reserved) leaving room for every enclave")
        taken: dict[tuple[str, int], str] = {}
        for key in ("listen", "health_listen", "metrics_listen"):
            value = getattr(self, key)
            if not value:
                continue
            address = host_port(value, key)
            if address.port and (address.host, address.port) in taken:
                raise ConfigError(f"{key} must be another address than {taken[(address.host, address.port)]}")
            taken[(address.host, address.port)] = key

    @property
    def listen_address(self) -> TcpAddress:
        return host_port(self.listen, "listen")

    @property
    def health_address(self) -> TcpAddress | None:
        return host_port(self.health_listen, "health_listen") if self.health_listen else None

    @property
    def metrics_address(self) -> TcpAddress | None:
        return host_port(self.metrics_listen, "metrics_listen") if self.metrics_listen else None

    @property
    def enclave_count(self) -> int:
        return int(self.enclave.get("count", 1))

    @property
    def enclave_cids(self) -> tuple[int, ...]:
        """The enclaves' vsock CIDs: ``enclave_cid``, ``enclave_cid + 1``, ... (one per enclave)."""
        return tuple(self.enclave_cid + i for i in range(self.enclave_count))

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_dir) if self.audit_dir else Path(self.run_dir) / "audit"

    def enclave_argv(self) -> Sequence[str]:
        argv = self.enclave.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
            raise ConfigError("enclave.argv must be a non-empty list of strings")
        return argv
