"""The KMS emulator's state on disk: keys (metadata, material versions, policy) and aliases.

Layout under ``state_dir`` (directory 0700, files 0600)::

    keys/<key uuid>.json   one key: account, region, metadata, policy, rotation, deletion schedule,
                           material versions
    aliases.json           {"format": 2, "aliases": [{"name": "alias/x", "account": "111122223333",
                            "region": "us-east-1", "key_id": uuid, "created": epoch seconds}, ...]}

Keys and aliases are regional, as in AWS: a key lives in one account and one region, and an alias name
is unique per account and region (``alias/x`` may exist in every account and region, each time for a key
of that account and region). Lookups here are by exactly that; who may see what is decided in
:mod:`.operations`.

Earlier state (format 1, before aliases were regional) is migrated when it is loaded: ``aliases.json``
was ``{"alias/name": {"key_id": uuid, "created": epoch seconds}}`` and each alias takes the account and
region of its target key (an alias whose key is gone is dropped); a key file without ``region`` /
``account`` takes them from its ARN, else ``default_region``. The migrated files are written back at once.

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
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nitrovault.errors import ConfigError
from nitrovault.files import write_atomic
from nitrovault.kms.endpoints import partition

__all__ = ["FORMAT", "AliasRecord", "KeyRecord", "Store", "replace"]


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
    def from_json(cls, data: dict[str, Any], *, default_region: str | None = None) -> KeyRecord:
        data = dict(data)
        data["materials"] = tuple(base64.b64decode(m) for m in data["materials"])
        arn = str(data.get("arn", "")).split(":")
        if not data.get("region"):  # an older file: the ARN says where the key was made
            data["region"] = arn[3] if len(arn) == 6 and arn[3] else default_region
            if not data["region"]:
                raise ConfigError(f"key {data.get('key_id')} has no region and no default region is set")
        if not data.get("account") and len(arn) == 6:
            data["account"] = arn[4]
        if not data.get("arn"):
            data["arn"] = (f"arn:{partition(data['region'])}:kms:{data['region']}:{data['account']}"
                           f":key/{data['key_id']}")
        return cls(**data)


@dataclass(frozen=True)
class AliasRecord:
    name: str            #: "alias/..."
    key_id: str
    created: float
    account: str
    region: str

    @property
    def arn(self) -> str:
        return f"arn:{partition(self.region)}:kms:{self.region}:{self.account}:{self.name}"


#: the current on-disk format of ``aliases.json`` (1: a name -> key map, before aliases were regional)
FORMAT = 2


AliasKey = tuple[str, str, str]   # (account, region, name)


class Store:
    """Thread-safe key and alias store, loaded once and written through on every change.

    ``default_region`` only serves the migration of key files that predate the ``region`` field.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, default_region: str | None = None) -> None:
        self.root = Path(state_dir)
        self._keys_dir = self.root / "keys"
        self._keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        os.chmod(self._keys_dir, 0o700)
        self.lock = threading.RLock()
        self._keys: dict[str, KeyRecord] = {}
        for path in sorted(self._keys_dir.glob("*.json")):
            raw = json.loads(path.read_text())
            record = KeyRecord.from_json(raw, default_region=default_region)
            self._keys[record.key_id] = record
            if not raw.get("region") or not raw.get("account"):
                self.put(record)  # migrated: write the complete record back
        self._aliases: dict[AliasKey, AliasRecord] = {}
        alias_file = self.root / "aliases.json"
        if alias_file.is_file():
            raw = json.loads(alias_file.read_text())
            if isinstance(raw, dict) and raw.get("format") == FORMAT:
                for entry in raw["aliases"]:
                    alias = AliasRecord(name=entry["name"], key_id=entry["key_id"], created=entry["created"],
                                        account=entry["account"], region=entry["region"])
                    self._aliases[(alias.account, alias.region, alias.name)] = alias
            elif isinstance(raw, dict) and "format" not in raw:
                self._migrate_v1_aliases(raw)
            else:
                raise ConfigError(f"{alias_file} has an unknown format (this emulator writes {FORMAT})")

    def _migrate_v1_aliases(self, raw: dict[str, Any]) -> None:
        for name, entry in raw.items():
            record = self._keys.get(entry["key_id"])
            if record is None:
                continue
            alias = AliasRecord(name=name, key_id=record.key_id, created=entry["created"],
                                account=record.account, region=record.region)
            self._aliases[(alias.account, alias.region, alias.name)] = alias
        self._write_aliases()

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
            write_atomic(self._keys_dir / f"{record.key_id}.json",
                          json.dumps(record.to_json(), sort_keys=True).encode())
            self._keys[record.key_id] = record

    def delete(self, key_id: str) -> None:
        with self.lock:
            self._keys.pop(key_id, None)
            (self._keys_dir / f"{uuid.UUID(key_id)}.json").unlink(missing_ok=True)
            for name in [n for n, a in self._aliases.items() if a.key_id == key_id]:
                del self._aliases[name]
            self._write_aliases()

    # -- aliases (per account and region) --------------------------------------------------------------

    def alias(self, account: str, region: str, name: str) -> AliasRecord | None:
        with self.lock:
            return self._aliases.get((account, region, name))

    def aliases(self, account: str, region: str) -> list[AliasRecord]:
        with self.lock:
            return sorted((a for a in self._aliases.values() if (a.account, a.region) == (account, region)),
                          key=lambda a: a.name)

    def put_alias(self, alias: AliasRecord) -> None:
        with self.lock:
            self._aliases[(alias.account, alias.region, alias.name)] = alias
            self._write_aliases()

    def _write_aliases(self) -> None:
        entries = [{"name": a.name, "account": a.account, "region": a.region, "key_id": a.key_id,
                    "created": a.created} for a in sorted(self._aliases.values(),
                                                          key=lambda a: (a.account, a.region, a.name))]
        write_atomic(self.root / "aliases.json",
                      json.dumps({"format": FORMAT, "aliases": entries}, sort_keys=True).encode())
