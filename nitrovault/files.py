"""Writing files that hold secrets or state: atomically, with the mode set before any byte lands.

The one writer for key files (the token issuer's, the stand-ins' PKI and KMS store, TLS keys), the
parent's status file and the local stack's records: a key is never world-readable, even briefly, and a
crash never leaves a half-written file where a whole one was (a reader sees the old file or the new one).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic", "write_private"]


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (``O_EXCL``, ``mode`` from
    the start, fsynced), then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # in case the umask narrowed or widened it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """:func:`write_atomic` of ``data`` (text is UTF-8), making a missing folder 0700 first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data.encode() if isinstance(data, str) else data, mode)
