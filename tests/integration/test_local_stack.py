"""The local stack end to end, through the real processes: KMS emulator, local NSM, parent (layer-4
relay, health endpoint, host services, supervisor) and the enclave in its own network namespace.

One stack is started for the session (``stack`` in ``conftest.py``, shared with
``test_local_access.py``; it takes ~15 s); the tests then drive it like a client would, with tokens from
the stack's local issuer, and break it the way an operator or an attacker would.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fakes import wait_until

from nitrovault.client import NitrovaultClient
from nitrovault.errors import ClientError
from nitrovault.local.homes import free_port
from nitrovault.local.stack import REPO_ROOT, LocalStack

pytestmark = pytest.mark.slow


@pytest.fixture
def client(stack: LocalStack) -> Iterator[NitrovaultClient]:
    with stack.client(stack.token(), timeout=30) as c:
        yield c


def test_serves_the_sealed_model_through_the_relay(stack: LocalStack, client: NitrovaultClient) -> None:
    vectors = client.embed(["A man is eating food.", "A man is eating a piece of bread.", "The sky."])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.6 > vectors[0] @ vectors[2]
    info = client.info()
    assert info.model_id == "all-minilm-l6-v2"
    assert info.pcrs[0] == stack.pcrs[0]


def test_the_client_attests_the_enclave_and_pins_the_sealed_certificate(
    stack: LocalStack, client: NitrovaultClient
) -> None:
    verified = client.attestation
    assert verified.document.pcrs[2] == stack.pcrs[2]
    assert client.certificate_pem == stack.paths.enclave_cert.read_bytes()


def test_bad_requests_get_clean_status_codes(stack: LocalStack, client: NitrovaultClient) -> None:
    with pytest.raises(ClientError) as too_long:
        client.embed(["x" * 10_000])
    assert too_long.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ClientError) as oversized:
        client.embed(["y" * 5000] * 1000)  # ~5 MB: over the enclave's request limit
    assert oversized.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(ClientError) as empty:
        client.embed([])
    assert empty.value.code == "INVALID_ARGUMENT"
    with stack.channel() as channel:
        garbage = channel.unary_unary("/nitrovault.v1.Inference/Embed")
        with pytest.raises(grpc.RpcError) as malformed:
            garbage(b"\xff\xff\xff\xff not a protobuf", timeout=10,
                    metadata=(("authorization", f"Bearer {stack.token()}"),))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "protobuf" not in (malformed.value.details() or "")
    assert client.embed(["still serving"]).shape == (1, 384)


def test_32_concurrent_clients_without_errors(stack: LocalStack) -> None:
    errors: list[BaseException] = []
    calls = [0] * 32
    stop_at = time.monotonic() + 4.0
    token = stack.token("load")

    def worker(i: int) -> None:
        try:
            with stack.client(token, timeout=30) as c:
                while calls[i] == 0 or time.monotonic() < stop_at:  # every client calls, however slow
                    assert c.embed([f"client {i} call {calls[i]}"]).shape == (1, 384)
                    calls[i] += 1
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a client thread did not finish"
    assert errors == []
    assert all(n >= 1 for n in calls)


def test_killed_enclave_gives_unavailable_then_recovers(stack: LocalStack, client: NitrovaultClient) -> None:
    pids = stack.enclave_pids()
    assert pids, "enclave process not found"
    exits = [os.pidfd_open(pid) for pid in pids]  # readable once the process has ended: no polling
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for fd in exits:
            select.select([fd], [], [], 30)
    finally:
        for fd in exits:
            os.close(fd)
    with pytest.raises(ClientError) as down:
        client.embed(["anyone there?"])
    assert down.value.code == "UNAVAILABLE"

    def recovered() -> bool:
        try:
            assert client.embed(["back again"]).shape == (1, 384)
        except ClientError as err:
            assert err.code == "UNAVAILABLE"
            return False
        return True

    wait_until(recovered, what="the stack to recover after the enclave was killed", timeout=90, interval=0.2)
    assert set(stack.enclave_pids()).isdisjoint(pids)


def test_edited_enclave_code_gets_no_key(tmp_path: Path) -> None:
    """Bind the key to the code, edit one line of enclave_app, keep the policy: KMS must deny."""
    tree = tmp_path / "tree"
    for name in ("nitrovault", "enclave_app", "parent_app", "requirements"):
        shutil.copytree(REPO_ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    base = [sys.executable, "-m", "nitrovault", "local", "up", "--once", "--home", str(home)]
    port = ["--listen", f"127.0.0.1:{free_port()}"]
    first = subprocess.run(base + port, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    boot = tree / "enclave_app" / "boot.py"
    boot.write_text(boot.read_text() + "\n# one edited line\n")
    port = ["--listen", f"127.0.0.1:{free_port()}"]
    second = subprocess.run(
        [*base, "--keep-policy", *port], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode != 0
    assert "key-release" in second.stdout
    assert "AccessDeniedException" in second.stdout
