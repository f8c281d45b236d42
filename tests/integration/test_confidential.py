"""The confidential path in process: TLS ends in the enclave server, the client verifies before it sends.

The server is the real :class:`enclave_app.server.EnclaveServer` with a sealed-style TLS identity, the
NSM the local fake over a throwaway PKI. Each verification step of :class:`nitrovault.client.NitrovaultClient`
gets a test that breaks only that step and checks that nothing (no token, no request) reached the server.
Hostile parents are played by relays between the client and the server's socket.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_enclave_server import CONFIG, PCRS, TOKEN, ServerThread, mlp_handler, mlp_module, short_socket_dir

from nitrovault.client import Expect, NitrovaultClient
from nitrovault.errors import (
    ClientError,
    DocumentTooOldError,
    PCRMismatchError,
    UntrustedRootError,
)
from nitrovault.identity import TlsIdentity
from nitrovault.local.nsm import make_local_nsm
from nitrovault.local.pki import LocalPki

NOW = datetime.now(UTC)
IDENTITY = TlsIdentity.generate("enclave.test.internal", now=NOW)


@pytest.fixture(scope="module")
def pki_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki") / "pki"


@dataclass
class Enclave:
    server: ServerThread
    directory: Path
    root: Any
    #: every authorization value the server saw (the test's view of "was the token sent?")
    seen_tokens: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.server.target

    def expect(self, **changes: Any) -> Expect:
        values: dict[str, Any] = {"pcrs": {0: PCRS[0], 1: PCRS[1], 2: PCRS[2]}, "root": self.root}
        values.update(changes)
        return Expect(**values)


def start_enclave(pki_root: Path, identity: TlsIdentity = IDENTITY) -> Enclave:
    directory = short_socket_dir()
    server = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"), tls=identity)
    server.serve(mlp_handler(mlp_module()))
    enclave = Enclave(server, directory, LocalPki.ensure(pki_root).root)
    original = server.server.service.protections.identify

    def spy(metadata: Any) -> Any:
        enclave.seen_tokens.extend(str(v) for k, v in metadata or () if k == "authorization")
        return original(metadata)

    server.server.service.protections.identify = spy  # type: ignore[method-assign]
    return enclave


@pytest.fixture
def enclave(pki_root: Path) -> Iterator[Enclave]:
    started = start_enclave(pki_root)
    try:
        yield started
    finally:
        started.server.close()
        shutil.rmtree(started.directory, ignore_errors=True)


ROWS = {"x": np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)}


def test_verified_call_pins_the_sealed_identity_and_checks_its_receipt(enclave: Enclave) -> None:
    with NitrovaultClient(enclave.target, expect=enclave.expect(), token=TOKEN) as client:
        outputs, receipted = client.infer_with_receipt(ROWS)
        assert client.fingerprint == IDENTITY.fingerprint
        assert client.attestation.pcrs[0] == PCRS[0]
    assert outputs["probabilities"].shape == (3, 3)
    assert receipted.receipt and receipted.request
    assert enclave.seen_tokens == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize("case", ["pcr0", "root", "stale"])
def test_a_wrong_expectation_refuses_before_the_token_is_sent(enclave: Enclave, case: str,
                                                              tmp_path: Path) -> None:
    expect, clock, error = enclave.expect(), None, PCRMismatchError
    if case == "pcr0":
        expect = enclave.expect(pcrs={0: bytes(48)})
    elif case == "root":
        expect, error = enclave.expect(root=LocalPki.ensure(tmp_path / "other").root), UntrustedRootError
    else:
        clock, error = (lambda: datetime.now(UTC) + timedelta(hours=1)), DocumentTooOldError
    with NitrovaultClient(enclave.target, expect=expect, token=TOKEN, clock=clock) as client, \
            pytest.raises(error):
        client.infer(ROWS)
    assert enclave.seen_tokens == []


def test_a_new_connection_is_attested_again_before_the_next_call(pki_root: Path) -> None:
    """The instance behind the address restarts (same fleet identity, a new boot key): the client's next
    call first attests the new connection, and receipts are checked against the new boot's key."""
    first = start_enclave(pki_root)
    target, directory = first.target, first.directory
    attests: list[str] = []
    try:
        with NitrovaultClient(target, expect=first.expect(), token=TOKEN) as client:
            client.infer(ROWS)
            first_key = client.attestation.document.user_data
            first.server.close()
            second = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"),
                                  tls=IDENTITY)
            second.serve(mlp_handler(mlp_module()))
            original = second.server.service._attest

            async def counted(request: Any) -> Any:
                attests.append("Attest")
                return await original(request)

            second.server.service._attest = counted  # type: ignore[method-assign]
            try:
                outcome = None
                for _ in range(3):  # the first call may still fail on the dead connection
                    try:
                        outcome = client.infer(ROWS)
                        break
                    except ClientError as err:
                        assert err.code == "UNAVAILABLE"
                assert outcome is not None
                assert attests, "the new connection was not attested"
                assert client.attestation.document.user_data != first_key  # the new boot's receipt key
            finally:
                second.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
