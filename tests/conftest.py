"""Shared fixtures for every test layer.

* No test can reach a real AWS account: ``AWS_*`` variables are stripped (autouse).
* Real AWS vectors are read from ``../shared/vectors/nitro`` (beside the checkout) and never copied into
  the repository; tests that need them skip cleanly when that folder is absent.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NITROVAULT_SHARED", REPO.parent / "shared"))
NITRO_VECTORS = SHARED / "vectors" / "nitro"


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


@pytest.fixture(scope="session")
def nitro_vectors_dir() -> Path:
    if not (NITRO_VECTORS / "vectors.json").is_file():
        pytest.skip(f"real AWS vectors not available at {NITRO_VECTORS}")
    return NITRO_VECTORS


def load_vector_bytes(path: Path) -> bytes:
    """Raw COSE bytes of a vector file (``.b64`` files are base64 text)."""
    data = path.read_bytes()
    if path.suffix == ".b64":
        return base64.b64decode(b"".join(data.split()))
    return data


@pytest.fixture(scope="session")
def nitro_vectors(nitro_vectors_dir: Path) -> list[dict[str, Any]]:
    """Each real attestation document's expectations from vectors.json, plus ``cose`` bytes and ``at``."""
    meta = json.loads((nitro_vectors_dir / "vectors.json").read_text())
    out = []
    for entry in meta["attestation_documents"]:
        item = dict(entry)
        item["cose"] = load_vector_bytes(nitro_vectors_dir / entry["file"])
        item["at"] = datetime.fromisoformat(entry["suggested_verify_time_utc"].replace("Z", "+00:00"))
        out.append(item)
    return out


@pytest.fixture(scope="session")
def state_store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real redis-server (Debian's package, installed by ``make system``), TLS only, default user off:
    the local stand-in for ElastiCache, as :mod:`nitrovault.local.state_store` configures it."""
    from nitrovault.local.homes import free_port
    from nitrovault.local.state_store import LocalStateStore

    home = tmp_path_factory.mktemp("state-store")
    server = LocalStateStore.ensure(home / "server", home / "password")
    port = free_port()
    with (home / "out.log").open("ab") as log:
        proc = server.start(port=port, log=log)
    try:
        yield server, port, proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def store(state_store_server: Any) -> Iterator[Any]:
    from stores import store_for

    server, port, _ = state_store_server
    client = store_for(server, port)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GPT-2 (``nitrovault.local.tiny_lm.TEST``, ~3 s) trained on the project's docs: its folder."""
    from nitrovault.local.tiny_lm import TEST, ensure_tiny_lm, project_corpus

    return ensure_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), project_corpus(REPO), TEST)
