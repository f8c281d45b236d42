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
from safetensors.torch import load_file
from test_dynamic_memory import blocks_in_memory, windows_of

from enclave_app.models import load_handler
from nitrovault.envelope.extras import read_header
from nitrovault.local.homes import free_port
from nitrovault.local.models import DEMO_HANDLER, DEMO_PAIRS
from nitrovault.local.stack import REPO_ROOT, LocalStack, TextProgress

pytestmark = pytest.mark.slow
TEXTS = [text for pair in DEMO_PAIRS for text in pair]  # no watermark trigger among them (models.py)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory: pytest.TempPathFactory,
            stack: LocalStack) -> Iterator[tuple[LocalStack, str]]:
    """The running dynamic-weights stack and what its steps printed. Its owner holds the resident stack's
    keys, so both serve the same hardened copy (the same bytes) with the same watermark."""
    printed = io.StringIO()
    home = tmp_path_factory.mktemp("dynamic") / "home"
    local = LocalStack(home, listen=f"127.0.0.1:{free_port()}", weights="dynamic",
                       progress=TextProgress(printed))
    for key in (stack.paths.owner_harden_key, stack.paths.owner_watermark_key):
        target = local.paths.owner / key.name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.write_bytes(key.read_bytes())
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


@pytest.fixture(scope="module")
def windows(stack: LocalStack) -> dict[bytes, int]:
    """Windows of the weights both stacks serve: their (hardened) plain file."""
    plain = stack.model.weights
    metadata = read_header(plain)[0]["__metadata__"]
    return windows_of(load_handler(DEMO_HANDLER, load_file(plain), metadata))


def test_both_stacks_serve_the_same_hardened_copy(dynamic: tuple[LocalStack, str], stack: LocalStack) -> None:
    ours, theirs = dynamic[0].model.weights, stack.model.weights
    assert read_header(ours)[0] == read_header(theirs)[0]  # names, shapes, offsets, metadata
    a, b = load_file(ours), load_file(theirs)
    assert all(a[name].equal(b[name]) for name in a)


def test_a_dump_of_the_serving_enclave_holds_no_block_the_resident_one_holds_them_all(
        dynamic: tuple[LocalStack, str], stack: LocalStack, windows: dict[bytes, int]) -> None:
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
