"""The KMS emulator's state on disk: keys (metadata, material versions, policy) and aliases.

Layout under ``state_dir`` (directory 0700, files 0600)::

    keys/<key uuid>.json   one key: metadata, policy, rotation, deletion schedule, material versions
    aliases.json           {"alias/name": {"key_id": uuid, "created": epoch seconds}}

Invariants:

* Every write is atomic (temp file in the same directory, fsync, ``os.replace``), so a crash leaves
  the old or the new state, never a torn file.
* Key material is 32 random bytes per version, stored base64; versions are never dropped, so blobs
  sealed before a rotation still open. This is an emulator: the material is NOT protected at rest
  beyond file permissions; never point it at real secrets.
* ``KeyRecord`` is frozen; updates go through :func:`dataclasses.replace` and :meth:`Store.put`.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["AliasRecord", "KeyRecord", "Store", "replace"]


@dataclass(frozen=True)
class KeyRecord:
    """One symmetric (SYMMETRIC_DEFAULT) KMS key."""

    key_id: str                      #: UUID string
    arn: str                         #: arn:aws:kms:<region>:<account>:key/<uuid>
    account: str
    region: str
    creation_date: float             #: epoch seconds
    policy: str                      #: the key policy document (JSON text)
    description: str = ""
    key_state: str = "Enabled"       #: Enabled | Disabled | PendingDeletion
    deletion_date: float | None = None
    pending_window_days: int | None = None
    rotation_enabled: bool = False
    rotation_period_days: int = 365
    next_rotation_date: float | None = None
    materials: tuple[bytes, ...] = field(default=(), repr=False)   #: index = material version

    @property
    def current_version(self) -> int:
        return len(self.materials) - 1

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["materials"] = [base64.b64encode(m).decode() for m in self.materials]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        data = dict(data)
        data["materials"] = tuple(base64.b64decode(m) for m in data["materials"])
        return cls(**data)


@dataclass(frozen=True)
class AliasRecord:
    name: str            #: "alias/..."
    key_id: str
    created: float


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    """Thread-safe key and alias store, loaded once and written through on every change."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self._keys_dir = self.root / "keys"
        self._keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        os.chmod(self._keys_dir, 0o700)
        self.lock = threading.RLock()
        self._keys: dict[str, KeyRecord] = {}
        for path in sorted(self._keys_dir.glob("*.json")):
            record = KeyRecord.from_json(json.loads(path.read_text()))
            self._keys[record.key_id] = record
        self._aliases: dict[str, AliasRecord] = {}
        alias_file = self.root / "aliases.json"
        if alias_file.is_file():
            for name, entry in json.loads(alias_file.read_text()).items():
                self._aliases[name] = AliasRecord(name, entry["key_id"], entry["created"])

    # -- keys ------------------------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyRecord | None:
        with self.lock:
            return self._keys.get(key_id)

    def all_keys(self) -> list[KeyRecord]:
        with self.lock:
            return sorted(self._keys.values(), key=lambda k: (k.creation_date, k.key_id))

    def put(self, record: KeyRecord) -> None:
        uuid.UUID(record.key_id)  # never a path component that is not a UUID
        with self.lock:
            _atomic_write(self._keys_dir / f"{record.key_id}.json",
                          json.dumps(record.to_json(), sort_keys=True).encode())
            self._keys[record.key_id] = record

    def delete(self, key_id: str) -> None:
        with self.lock:
            self._keys.pop(key_id, None)
            (self._keys_dir / f"{uuid.UUID(key_id)}.json").unlink(missing_ok=True)
            for name in [n for n, a in self._aliases.items() if a.key_id == key_id]:
                del self._aliases[name]
            self._write_aliases()

    # -- aliases ---------------------------------------------------------------------------------------

    def alias(self, name: str) -> AliasRecord | None:
        with self.lock:
            return self._aliases.get(name)

    def aliases(self) -> list[AliasRecord]:
        with self.lock:
            return sorted(self._aliases.values(), key=lambda a: a.name)

    def put_alias(self, alias: AliasRecord) -> None:
        with self.lock:
            self._aliases[alias.name] = alias
            self._write_aliases()

    def _write_aliases(self) -> None:
        data = {a.name: {"key_id": a.key_id, "created": a.created} for a in self._aliases.values()}
        _atomic_write(self.root / "aliases.json", json.dumps(data, sort_keys=True).encode())
