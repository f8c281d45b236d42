"""The local shared state store: a real ``redis-server`` (Debian's package), TLS only, one RBAC user.

It stands in for ElastiCache for Valkey the way the deployment configures it (``docs/deploy.md``):

* **TLS only** (``port 0``, ``tls-port``), with a server certificate for :data:`HOST` from a local CA in
  ``HOME/aws/state-store/tls`` (:class:`~nitrovault.local.kms.tls.KmsTls` reused with no region). The
  enclave config measures that CA, as it measures Amazon's roots in production.
* **The default user is off**; the only user is :data:`USERNAME`, limited to keys ``nv:*``. Its
  password is made once in ``HOME/owner/state-store.password`` (0600): the owner seals it with the
  model, so it reaches only attested enclaves. The server's ACL file holds only its SHA-256
  (``#<hex>``), and nothing under ``HOME/parent`` ever holds it: the parent relays TLS bytes and has no
  credential to speak for itself.
* ``maxmemory-policy noeviction`` (a full store refuses writes instead of forgetting spend) and an
  append-only file, so restarting the server loses nothing.

Example::

    store = LocalStateStore.ensure(home / "aws" / "state-store", home / "owner" / "state-store.password")
    proc = store.start(port=free_port(), log=log_file)   # waits until it accepts TLS connections
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from nitrovault.files import write_atomic
from nitrovault.local.kms.tls import KmsTls

__all__ = ["HOST", "USERNAME", "LocalStateStore", "redis_server_binary"]

#: the store's host name: SNI and the name in its certificate (what the measured config names)
HOST = "state.nitrovault.local"
#: the enclaves' store user
USERNAME = "nitrovault-enclave"
_BINARIES = ("valkey-server", "redis-server")


def redis_server_binary() -> str | None:
    """``valkey-server`` or ``redis-server`` on PATH (the Makefile installs Debian's redis-server)."""
    for name in _BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass(frozen=True)
class LocalStateStore:
    """The store's files (made once by :meth:`ensure`): TLS, ACL, data folder, the owner's password."""

    directory: Path
    password_file: Path
    tls: KmsTls

    @property
    def ca_pem(self) -> bytes:
        return self.tls.ca_pem

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def acl_file(self) -> Path:
        return self.directory / "users.acl"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @classmethod
    def ensure(cls, directory: Path, password_file: Path) -> LocalStateStore:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not password_file.exists():
            password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(password_file, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
        store = cls(directory, password_file, KmsTls.ensure(directory / "tls", [], extra_names=[HOST]))
        digest = hashlib.sha256(store.password.encode()).hexdigest()
        acl = (
            "user default off resetchannels -@all\n"
            f"user {USERNAME} on #{digest} resetchannels ~nv:* -@all +@read +@write +@scripting "
            "+ping +hello +auth +client|setname -flushall -flushdb -keys\n"
        )
        write_atomic(store.acl_file, acl.encode(), mode=0o600)
        store.data_dir.mkdir(mode=0o700, exist_ok=True)
        return store

    def config(self, port: int) -> str:
        return "\n".join([
            "bind 127.0.0.1",
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {self.tls.cert_path}",
            f"tls-key-file {self.tls.key_path}",
            f"tls-ca-cert-file {self.tls.ca_path}",
            "tls-auth-clients no",
            "tls-protocols \"TLSv1.2 TLSv1.3\"",
            f"aclfile {self.acl_file}",
            f"dir {self.data_dir}",
            "appendonly yes",
            "appendfsync everysec",
            "save \"\"",
            "maxmemory 256mb",
            "maxmemory-policy noeviction",
            "daemonize no",
            "protected-mode yes",
            "",
        ])

    def start(self, *, port: int, log: IO[bytes], timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """Run the server on 127.0.0.1:``port`` (TLS); returns once it accepts connections."""
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server (or valkey-server) is not installed: `make system` "
                                    "installs Debian's redis-server")
        conf = self.directory / "server.conf"
        write_atomic(conf, self.config(port).encode(), mode=0o600)
        log_path = self.directory / "server.log"
        log_path.unlink(missing_ok=True)
        proc = subprocess.Popen([binary, str(conf), "--logfile", str(log_path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            if "Ready to accept connections" in text:
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        proc.terminate()
        raise TimeoutError(f"redis-server not ready after {timeout:.0f}s; see {log_path}")
