"""Fixtures shared by the integration tests that drive the local stack's real processes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nitrovault.local.homes import free_port
from nitrovault.local.stack import LocalStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One local stack (KMS emulator, NSM, parent, enclave) for every test module that asks for it."""
    home = tmp_path_factory.mktemp("stack")
    local = LocalStack(home, listen=f"127.0.0.1:{free_port()}")
    try:
        local.start()
        yield local
    finally:
        local.close()


@pytest.fixture
def d() -> Iterator[Path]:
    """A private folder with a short path (tmp_path can exceed the 107-byte unix socket path limit)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="nv")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)
