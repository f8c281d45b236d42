"""Where the parent gets what it hands the enclave: AWS credentials and sealed model bytes.

Production: credentials from IMDSv2 (the instance role, refreshed before expiry) and sealed models from S3.
Locally: static credentials from a 0600 JSON file and sealed models from a directory. The enclave trusts
neither: KMS enforces the attestation condition whatever the credentials, and the sealed model must
authenticate under the released key.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from nitrovault.errors import ConfigError

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)
    expiration: datetime | None = None


class CredentialsSource(Protocol):
    def get(self) -> Credentials: ...


class ModelSource(Protocol):
    def size(self, model_id: str) -> int: ...

    def read(self, model_id: str, offset: int, length: int) -> Iterator[bytes]: ...


def check_model_id(model_id: str) -> str:
    if not MODEL_ID.match(model_id):
        raise ConfigError("invalid model id")
    return model_id


@dataclass(frozen=True)
class StaticCredentials:
    """Credentials from a 0600 JSON file with ``access_key_id``, ``secret_access_key``, ``session_token``."""

    path: Path

    def get(self) -> Credentials:
        try:
            data = json.loads(self.path.read_text())
            return Credentials(
                data["access_key_id"], data["secret_access_key"], data.get("session_token", "")
            )
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"cannot read credentials file {self.path} ({type(err).__name__})") from None


class ImdsCredentials:
    """The instance role's credentials from IMDSv2, cached until five minutes before they expire."""

    BASE = "http://169.254.169.254/latest"

    def __init__(self, *, refresh_margin_s: float = 300.0, timeout_s: float = 2.0) -> None:
        self._margin = refresh_margin_s
        self._timeout = timeout_s
        self._lock = threading.Lock()
        self._cached: Credentials | None = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str:
        request = urllib.request.Request(f"{self.BASE}{path}", method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310 - fixed IMDS URL
            return str(response.read().decode())

    def get(self) -> Credentials:
        with self._lock:
            cached = self._cached
            if cached and cached.expiration and cached.expiration.timestamp() - time.time() > self._margin:
                return cached
            token = self._request("PUT", "/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            auth = {"X-aws-ec2-metadata-token": token}
            role = self._request("GET", "/meta-data/iam/security-credentials/", auth).split("\n")[0]
            data: dict[str, Any] = json.loads(
                self._request("GET", f"/meta-data/iam/security-credentials/{role}", auth)
            )
            self._cached = Credentials(
                data["AccessKeyId"],
                data["SecretAccessKey"],
                data["Token"],
                datetime.fromisoformat(data["Expiration"].replace("Z", "+00:00")).astimezone(UTC),
            )
            return self._cached


@dataclass(frozen=True)
class DirectoryModels:
    """Sealed models as ``DIR/<model_id>.sealed``."""

    directory: Path

    def _path(self, model_id: str) -> Path:
        return self.directory / f"{check_model_id(model_id)}.sealed"

    def size(self, model_id: str) -> int:
        try:
            return self._path(model_id).stat().st_size
        except FileNotFoundError:
            raise ConfigError(f"no sealed model {model_id!r}") from None

    def read(self, model_id: str, offset: int, length: int) -> Iterator[bytes]:
        with self._path(model_id).open("rb") as f:
            f.seek(offset)
            left = length
            while left > 0:
                data = f.read(min(CHUNK, left))
                if not data:
                    return
                left -= len(data)
                yield data


@dataclass(frozen=True)
class S3Models:
    """Sealed models as ``s3://BUCKET/PREFIX<model_id>.sealed`` (the bucket is SSE-KMS, TLS only)."""

    bucket: str
    prefix: str
    client: Any  # a boto3 S3 client

    def _key(self, model_id: str) -> str:
        return f"{self.prefix}{check_model_id(model_id)}.sealed"

    def size(self, model_id: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(model_id))["ContentLength"])

    def read(self, model_id: str, offset: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self._key(model_id), Range=f"bytes={offset}-{offset + length - 1}"
        )
        yield from answer["Body"].iter_chunks(CHUNK)
