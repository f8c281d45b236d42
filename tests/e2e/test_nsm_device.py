"""The real ``/dev/nsm`` through :class:`nitrovault.nsm.DeviceTransport` (inside a Nitro Enclave only).

Opt-in: ``NITROVAULT_E2E_ENCLAVE=1 pytest -m enclave tests/e2e/test_nsm_device.py``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from nitrovault.attestation import Expectations, verify_document
from nitrovault.errors import NsmError
from nitrovault.nsm import DeviceTransport, Nsm

pytestmark = [
    pytest.mark.enclave,
    pytest.mark.skipif(os.environ.get("NITROVAULT_E2E_ENCLAVE") != "1",
                       reason="needs a real Nitro Enclave (set NITROVAULT_E2E_ENCLAVE=1)"),
]


@pytest.fixture(scope="module")
def nsm() -> Nsm:
    return Nsm(DeviceTransport())


def test_describe_nsm(nsm: Nsm) -> None:
    d = nsm.describe_nsm()
    assert d.digest == "SHA384" and d.max_pcrs == 32
    assert set(range(16)) <= d.locked_pcrs


def test_get_random(nsm: Nsm) -> None:
    a, b = nsm.get_random(), nsm.get_random()
    assert len(a) > 0 and a != b


def test_boot_pcrs_are_read_only(nsm: Nsm) -> None:
    state = nsm.describe_pcr(0)
    assert state.locked and len(state.data) == 48
    with pytest.raises(NsmError) as info:
        nsm.extend_pcr(0, b"x")
    assert info.value.code == "ReadOnlyIndex"


def test_attestation_verifies_against_the_aws_root(nsm: Nsm) -> None:
    nonce = os.urandom(32)
    doc = nsm.attestation(nonce=nonce, user_data=b"nitrovault-e2e")
    verified = verify_document(doc, at=datetime.now(UTC), expect=Expectations(nonce=nonce),
                               unsafe_allow_debug=True)  # e2e runs may use a debug-mode enclave
    assert verified.user_data == b"nitrovault-e2e"
    assert verified.pcrs[0] == nsm.describe_pcr(0).data
