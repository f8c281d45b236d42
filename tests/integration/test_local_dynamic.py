"""``nitrovault local up --weights dynamic``: the demo MiniLM served by the local stack's real processes
with ``protection.weights.mode = dynamic`` in the measured config, against the session's resident stack.

The test plays the hostile parent's memory dump on the real enclave process: after a served call, no
16-byte window of any block's weights is anywhere in its anonymous memory, while the same scan of the
resident stack's enclave finds every block (the control). What callers get is the resident stack's answer,
byte for byte.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_dynamic_memory import blocks_in_memory, windows  # noqa: F401 - the fixture

from nitrovault.local.homes import free_port
from nitrovault.local.models import DEMO_PAIRS
from nitrovault.local.stack import REPO_ROOT, LocalStack, TextProgress

pytestmark = pytest.mark.slow
TEXTS = [text for pair in DEMO_PAIRS for text in pair]  # no watermark trigger among them (models.py)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, str]]:
    """The running dynamic-weights stack and what its steps printed."""
    printed = io.StringIO()
    local = LocalStack(tmp_path_factory.mktemp("dynamic") / "home", listen=f"127.0.0.1:{free_port()}",
                       weights="dynamic", progress=TextProgress(printed))
    try:
        local.start()
        yield local, printed.getvalue()
    finally:
        local.close()


def _embed(stack: LocalStack) -> np.ndarray:
    with stack.client(stack.token(), timeout=60) as client:
        return client.embed(TEXTS, normalize=True)


def test_the_measured_config_asks_for_dynamic_weights_and_the_demo_says_so(
        dynamic: tuple[LocalStack, str]) -> None:
    local, printed = dynamic
    config = json.loads(local.paths.enclave_config.read_text())
    assert config["protection"]["weights"] == {"mode": "dynamic"}
    assert "dynamic weights (at most 1 block(s) decrypted at once)" in printed
    assert "cos = " in printed


def test_callers_get_the_resident_stacks_answers_byte_for_byte(dynamic: tuple[LocalStack, str],
                                                                stack: LocalStack) -> None:
    assert _embed(dynamic[0]).tobytes() == _embed(stack).tobytes()


def test_a_dump_of_the_serving_enclave_holds_no_block_the_resident_one_holds_them_all(
        dynamic: tuple[LocalStack, str], stack: LocalStack, windows: dict[bytes, int]) -> None:  # noqa: F811
    found: dict[str, set[int]] = {}
    for name, local in (("resident", stack), ("dynamic", dynamic[0])):
        _embed(local)
        pids = local.enclave_pids()
        assert pids
        found[name] = set().union(*(blocks_in_memory(pid, windows) for pid in pids))
    assert found == {"resident": set(range(6)), "dynamic": set()}


def test_an_unknown_weights_mode_is_refused_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "nitrovault", "local", "up", "--once", "--home",
                           str(tmp_path), "--weights", "lazy"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 2
    assert "lazy" in done.stderr
