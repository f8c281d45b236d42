"""The parent's configuration (JSON). The parent is untrusted, so nothing here can weaken the enclave:
it only says where to listen, where things are, and how to start the enclave. Unknown keys are rejected.

Example (local stack)::

    {"listen": "127.0.0.1:50051", "region": "us-east-1", "run_dir": "/tmp/nv/parent",
     "credentials": {"kind": "static", "file": "creds.json"},
     "models": {"kind": "directory", "path": "models"},
     "kms_proxy_target": "tcp:127.0.0.1:4566",
     "enclave": {"kind": "process", "argv": ["python", "-m", "..."]}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nitrovault.errors import ConfigError


@dataclass(frozen=True)
class ParentConfig:
    #: public gRPC listener ("HOST:PORT" or "unix:PATH")
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
    #: ``{"kind": "nitro-cli", "eif": PATH, "cpu_count": N, "memory_mib": M}``
    enclave: Mapping[str, Any]
    #: TLS certificate chain and key (PEM files) for the public listener; both or neither
    tls_cert: str = ""
    tls_key: str = ""
    #: where the local KMS proxy relays vsock(3, kms_proxy) to; empty in production (vsock-proxy does it)
    kms_proxy_target: str = ""
    enclave_cid: int = 16
    inference_port: int = 5000
    host_services_port: int = 8001
    kms_proxy_port: int = 8000
    max_concurrent_calls: int = 256
    max_message_bytes: int = 8 * 1024 * 1024
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
        if not isinstance(self.audit_max_bytes, int) or self.audit_max_bytes < 1:
            raise ConfigError("audit_max_bytes must be a positive integer")

    @property
    def audit_path(self) -> Path:
        return Path(self.audit_dir) if self.audit_dir else Path(self.run_dir) / "audit"

    def enclave_argv(self) -> Sequence[str]:
        argv = self.enclave.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
            raise ConfigError("enclave.argv must be a non-empty list of strings")
        return argv
