"""Opt-in tests against real AWS or a real enclave: skipped unless explicitly enabled."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gates = {"aws": "NITROVAULT_E2E_AWS", "enclave": "NITROVAULT_E2E_ENCLAVE"}
    for item in items:
        for marker, env in gates.items():
            if marker in item.keywords and os.environ.get(env) != "1":
                item.add_marker(pytest.mark.skip(reason=f"opt-in: set {env}=1"))
