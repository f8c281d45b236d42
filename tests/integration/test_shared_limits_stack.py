"""Limits a hostile parent cannot reset, through the local stack's real processes and a real redis-server.

The parent kills and restarts the enclave at will, runs several enclaves, stalls the store's traffic and
holds every file and credential under ``HOME/parent``. None of it gives a subject more than its quota:

* a subject that exhausted its daily quota is still refused after the enclave is killed and restarted;
* two stacks (two enclaves, two parents, one store) share one quota exactly, also when 16 clients race
  for the last units;
* with the store stalled (SIGSTOP: the parent "delays" it) protected calls get UNAVAILABLE, not
  unlimited service, and serving resumes when it answers again;
* nothing the parent holds authenticates to the store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nitrovault.errors import StateStoreCredentialError
from nitrovault.local.homes import free_port
from nitrovault.local.stack import LocalStack
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack_b(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A second stack (its own KMS, parent and enclave) on the first one's state store, with the same
    token issuer: one deployment's second instance."""
    home = tmp_path_factory.mktemp("stack-b")
    shutil.copytree(stack.paths.issuer, home / "owner" / "issuer")
    other = LocalStack(home, listen=f"127.0.0.1:{free_port()}", shared_store=stack)
    try:
        other.start()
        yield other
    finally:
        other.close()


def _embed(stack: LocalStack, token: str, text: str) -> grpc.StatusCode:
    return _call(stack, token, text)[0]


def _call(stack: LocalStack, token: str, text: str) -> tuple[grpc.StatusCode, dict[str, str]]:
    """The status of one Embed call and its trailing metadata."""
    with stack.channel() as channel:
        try:
            pb_grpc.InferenceStub(channel).Embed(pb.EmbedRequest(texts=[text]),
                                                 metadata=(("authorization", f"Bearer {token}"),), timeout=60)
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ())  # type: ignore[no-any-return]
    return grpc.StatusCode.OK, {}


def _until_midnight() -> float:
    now = datetime.now(UTC)
    return (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC) - now).total_seconds()


def test_killing_the_enclave_does_not_reset_a_daily_quota(stack: LocalStack) -> None:
    token = stack.token("restart-resetter", tier="test-daily")  # 3 calls per UTC day
    assert [_embed(stack, token, f"call {i}") for i in range(3)] == [grpc.StatusCode.OK] * 3
    assert _embed(stack, token, "one too many") == grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(2):  # what the in-memory ledger gave away: a fresh daily allowance per boot
        stack.kill_enclave()
        code, trailing = _call(stack, token, "after a restart")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the daily limit, not the rate (the tier's bucket is far from empty): retry after UTC midnight
        assert abs(int(trailing["retry-after"]) - _until_midnight()) < 120
    assert _embed(stack, stack.token("someone-else", tier="test-daily"), "hi") == grpc.StatusCode.OK


def test_two_enclaves_share_one_quota_exactly_under_a_race(stack: LocalStack, stack_b: LocalStack) -> None:
    token = stack.token("racer", tier="test-race")  # 10 calls per day, over both stacks
    assert _embed(stack_b, token, "b first") == grpc.StatusCode.OK  # the issuer is shared, so is the count
    codes: list[grpc.StatusCode] = []
    start = threading.Barrier(16)

    def race(target: LocalStack, i: int) -> None:
        start.wait()
        for j in range(2):
            codes.append(_embed(target, token, f"race {i} {j}"))

    threads = [threading.Thread(target=race, args=(stack if i % 2 else stack_b, i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(codes) == 32
    assert codes.count(grpc.StatusCode.OK) == 9  # the 10th unit went to "b first": exactly the quota
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert _embed(stack, token, "a after") == _embed(stack_b, token, "b after") == (
        grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_a_stalled_store_fails_closed_then_serving_resumes(stack: LocalStack) -> None:
    assert stack.store_service is not None
    store = stack.store_service.process
    assert store is not None
    token = stack.token("patient")
    assert _embed(stack, token, "before") == grpc.StatusCode.OK
    os.kill(store.pid, signal.SIGSTOP)  # the parent delays the store's traffic indefinitely
    try:
        with stack.channel() as channel, pytest.raises(grpc.RpcError) as stalled:
            pb_grpc.InferenceStub(channel).Embed(pb.EmbedRequest(texts=["during"]),
                                                 metadata=(("authorization", f"Bearer {token}"),), timeout=60)
        assert stalled.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stalled.value.details() == "service temporarily unavailable; retry later"
    finally:
        os.kill(store.pid, signal.SIGCONT)
    assert _embed(stack, token, "after") == grpc.StatusCode.OK


def test_nothing_the_parent_holds_authenticates_to_the_store(stack: LocalStack) -> None:
    assert stack.store_service is not None
    password = stack.store_service.store.password.encode()
    for path in stack.paths.parent.rglob("*"):  # config, credentials, sealed model, audit log, sockets
        if path.is_file():
            assert password not in path.read_bytes(), path
    for pid in stack.parent_pids():
        for name in ("cmdline", "environ"):
            assert password not in Path(f"/proc/{pid}/{name}").read_bytes()
    credentials = json.loads(stack.paths.parent_credentials.read_text())
    ca = stack.store_service.store.ca_pem.decode()
    port = stack.store_service.port
    for username, secret in ((None, None), ("default", credentials["secret_access_key"]),
                             ("nitrovault-enclave", credentials["secret_access_key"]),
                             ("nitrovault-enclave", credentials["access_key_id"])):
        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_data=ca, ssl_check_hostname=False,
                             username=username, password=secret, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    with pytest.raises(StateStoreCredentialError):
        stack.store_client(password=credentials["secret_access_key"]).ping()
    stack.store_client().ping()  # the owner's copy of the sealed password does work: the test can fail
