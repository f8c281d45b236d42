"""KMS ``Recipient``: the emulator verifies a local attestation document and answers CiphertextForRecipient.

Documents come from the local NSM (``nitrovault.local.nsm``) signed by a local PKI; the emulator trusts
that PKI's root. Each negative test breaks one thing: the PCR0, the document's age, the certificate's
validity, the root, the signature, the debug-mode flag, the key algorithm, the public key.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nitrovault.clock import utc_now
from nitrovault.kms import RecipientKey, open_ciphertext_for_recipient
from nitrovault.local.kms import KmsEmulator, parse_principals
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.policy.build import model_key_policy

ACCOUNT = "111122223333"
REGION = "us-east-1"
ADMIN, SEALER, ENCLAVE = (f"arn:aws:iam::{ACCOUNT}:role/{n}" for n in ("admin", "sealer", "enclave"))
PRINCIPALS = {
    "AKIDADMIN": {"secret": "admin-secret", "arn": ADMIN},
    "AKIDSEALER": {"secret": "sealer-secret", "arn": SEALER},
    "AKIDENCLAVE": {"secret": "enclave-secret", "arn": ENCLAVE},
}
GOOD_PCRS = {0: b"\xa0" * 48, 1: b"\xa1" * 48, 2: b"\xa2" * 48}
CONTEXT = {"model": "demo", "version": "1"}
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
SESSION = boto3.session.Session()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def recipient_key() -> RecipientKey:
    return RecipientKey.generate()


def document(pki: LocalPki, key: RecipientKey | None, *, pcrs: dict[int, bytes] = GOOD_PCRS,
             age: timedelta = timedelta(0), module_id: str = MODULE_ID) -> bytes:
    def clock() -> datetime:
        return utc_now() - age

    nsm = Nsm(LocalNsmDevice(pki, pcrs=pcrs, module_id=module_id, clock=clock))
    return nsm.attestation(public_key=key.public_key_der if key is not None else None)


@dataclass
class Stack:
    emulator: KmsEmulator
    url: str
    audit: list[dict[str, Any]]
    key_arn: str = ""

    def client(self, akid: str) -> Any:
        return SESSION.client("kms", endpoint_url=self.url, region_name=REGION, aws_access_key_id=akid,
                              aws_secret_access_key=PRINCIPALS[akid]["secret"],
                              config=Config(retries={"max_attempts": 1}))


def _start(tmp_path: Path, pki: LocalPki, *, unsafe_debug: bool = False) -> Stack:
    audit: list[dict[str, Any]] = []
    emulator = KmsEmulator(tmp_path / "state", pki.root, parse_principals(PRINCIPALS), REGION,
                           max_document_age=timedelta(minutes=5), audit=audit.append,
                           unsafe_allow_debug_attestation=unsafe_debug)
    stack = Stack(emulator, emulator.serve("127.0.0.1", 0).endpoint_url, audit)
    policy = model_key_policy(account_id=ACCOUNT, admin_arns=[ADMIN], sealer_arns=[SEALER],
                              enclave_role_arns=[ENCLAVE], pcrs=GOOD_PCRS, encryption_context=CONTEXT)
    stack.key_arn = stack.client("AKIDADMIN").create_key(Policy=json.dumps(policy))["KeyMetadata"]["Arn"]
    return stack


@pytest.fixture
def stack(tmp_path: Path, pki: LocalPki) -> Iterator[Stack]:
    s = _start(tmp_path, pki)
    yield s
    s.emulator.shutdown()


def permissive(stack: Stack) -> None:
    """Replace the key policy by one that lets the enclave role do everything, attested or not."""
    stack.client("AKIDADMIN").put_key_policy(KeyId=stack.key_arn, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": [ADMIN, ENCLAVE]}, "Action": "kms:*",
             "Resource": "*"}]}))


def sealed_data_key(stack: Stack) -> tuple[bytes, bytes]:
    out = stack.client("AKIDSEALER").generate_data_key(KeyId=stack.key_arn, KeySpec="AES_256",
                                                        EncryptionContext=CONTEXT)
    return out["Plaintext"], out["CiphertextBlob"]


def recipient(doc: bytes, algorithm: str = "RSAES_OAEP_SHA_256") -> dict[str, Any]:
    return {"KeyEncryptionAlgorithm": algorithm, "AttestationDocument": doc}


def denied(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    assert excinfo.value.response["Error"]["Code"] == "AccessDeniedException"
    return str(excinfo.value.response["Error"]["Message"])


# -- release -------------------------------------------------------------------------------------------------


def test_right_pcrs_release_the_data_key_only_as_ciphertext_for_recipient(
    stack: Stack, pki: LocalPki, recipient_key: RecipientKey
) -> None:
    data_key, blob = sealed_data_key(stack)
    enclave = stack.client("AKIDENCLAVE")
    with pytest.raises(ClientError) as exc:  # the model policy denies Decrypt without attestation
        enclave.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    denied(exc)

    answer = enclave.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                             Recipient=recipient(document(pki, recipient_key)))
    assert "Plaintext" not in answer or not answer["Plaintext"]
    assert answer["KeyId"] == stack.key_arn
    released = open_ciphertext_for_recipient(answer["CiphertextForRecipient"], recipient_key.private_key)
    assert released == data_key

    # The same principal, without Recipient, under a permissive policy gets the same plaintext.
    permissive(stack)
    assert enclave.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"] == released

    record = next(r for r in stack.audit if r["allowed"])
    assert record["principal"] == ENCLAVE and record["operation"] == "kms:Decrypt"
    assert record["key"] == stack.key_arn and record["module_id"].startswith("i-0123456789abcdef0")
    assert record["pcr0_prefix"] == GOOD_PCRS[0].hex()[:16]
    assert data_key.hex() not in json.dumps(stack.audit)


def test_generate_data_key_and_random_with_recipient(
    stack: Stack, pki: LocalPki, recipient_key: RecipientKey
) -> None:
    permissive(stack)
    enclave = stack.client("AKIDENCLAVE")
    doc = document(pki, recipient_key)
    out = enclave.generate_data_key(KeyId=stack.key_arn, NumberOfBytes=32, EncryptionContext=CONTEXT,
                                    Recipient=recipient(doc))
    assert "Plaintext" not in out or not out["Plaintext"]
    key = open_ciphertext_for_recipient(out["CiphertextForRecipient"], recipient_key.private_key)
    assert len(key) == 32
    again = enclave.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert again["Plaintext"] == key

    rnd = enclave.generate_random(NumberOfBytes=48, Recipient=recipient(doc))
    assert "Plaintext" not in rnd or not rnd["Plaintext"]
    assert len(open_ciphertext_for_recipient(rnd["CiphertextForRecipient"], recipient_key.private_key)) == 48


def test_openssl_cms_decrypt_opens_the_answer(
    stack: Stack, pki: LocalPki, recipient_key: RecipientKey, tmp_path: Path
) -> None:
    data_key, blob = sealed_data_key(stack)
    answer = stack.client("AKIDENCLAVE").decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                                                 Recipient=recipient(document(pki, recipient_key)))
    (tmp_path / "cfr.ber").write_bytes(answer["CiphertextForRecipient"])
    (tmp_path / "key.pem").write_bytes(recipient_key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    opened = subprocess.run(
        ["openssl", "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "cfr.ber"),
         "-inkey", str(tmp_path / "key.pem"), "-binary"], capture_output=True, check=True, timeout=30)
    assert opened.stdout == data_key


# -- refusals ------------------------------------------------------------------------------------------------


def test_wrong_pcr0_is_denied(stack: Stack, pki: LocalPki, recipient_key: RecipientKey) -> None:
    _, blob = sealed_data_key(stack)
    doc = document(pki, recipient_key, pcrs={**GOOD_PCRS, 0: b"\xbb" * 48})
    with pytest.raises(ClientError) as exc:
        stack.client("AKIDENCLAVE").decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                                            Recipient=recipient(doc))
    assert "kms:Decrypt" in denied(exc)
    assert exc.value.response.get("CiphertextForRecipient") is None
    assert stack.audit[-1]["allowed"] is False and stack.audit[-1]["pcr0_prefix"] == ("bb" * 8)


@pytest.mark.parametrize("age,step", [(timedelta(minutes=6), "freshness"), (timedelta(hours=4), "validity")])
def test_old_or_expired_document_is_denied(
    stack: Stack, pki: LocalPki, recipient_key: RecipientKey, age: timedelta, step: str
) -> None:
    _, blob = sealed_data_key(stack)
    with pytest.raises(ClientError) as exc:
        stack.client("AKIDENCLAVE").decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                                            Recipient=recipient(document(pki, recipient_key, age=age)))
    assert f"failed step: {step}" in denied(exc)


def test_document_from_another_root_is_denied(
    stack: Stack, recipient_key: RecipientKey, tmp_path: Path
) -> None:
    _, blob = sealed_data_key(stack)
    stranger = LocalPki.ensure(tmp_path / "other-pki")
    with pytest.raises(ClientError) as exc:
        stack.client("AKIDENCLAVE").decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                                            Recipient=recipient(document(stranger, recipient_key)))
    assert "attestation document" in denied(exc)


def test_forged_signature_is_denied(stack: Stack, pki: LocalPki, recipient_key: RecipientKey) -> None:
    _, blob = sealed_data_key(stack)
    doc = bytearray(document(pki, recipient_key))
    doc[-1] ^= 1  # the last byte of the raw r||s signature
    with pytest.raises(ClientError) as exc:
        stack.client("AKIDENCLAVE").decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT,
                                            Recipient=recipient(bytes(doc)))
    assert "failed step: signature" in denied(exc)


def test_debug_document_needs_the_unsafe_flag(
    tmp_path: Path, pki: LocalPki, recipient_key: RecipientKey
) -> None:
    debug_pcrs = {0: bytes(48), 1: bytes(48), 2: bytes(48)}
    for unsafe in (False, True):
        stack = _start(tmp_path / str(unsafe), pki, unsafe_debug=unsafe)
        try:
            permissive(stack)
            enclave = stack.client("AKIDENCLAVE")
            call = dict(NumberOfBytes=16, Recipient=recipient(document(pki, recipient_key, pcrs=debug_pcrs)))
            if unsafe:
                assert "CiphertextForRecipient" in enclave.generate_random(**call)
            else:
                with pytest.raises(ClientError) as exc:
                    enclave.generate_random(**call)
                assert "failed step: debug-mode" in denied(exc)
        finally:
            stack.emulator.shutdown()


def test_only_rsaes_oaep_sha_256(stack: Stack, pki: LocalPki, recipient_key: RecipientKey) -> None:
    with pytest.raises(ClientError) as exc:
        stack.client("AKIDENCLAVE").generate_random(
            NumberOfBytes=16, Recipient=recipient(document(pki, recipient_key), "RSAES_OAEP_SHA_1"))
    assert exc.value.response["Error"]["Code"] == "ValidationException"


def test_document_must_carry_an_rsa_public_key(stack: Stack, pki: LocalPki) -> None:
    enclave = stack.client("AKIDENCLAVE")
    with pytest.raises(ClientError) as exc:
        enclave.generate_random(NumberOfBytes=16, Recipient=recipient(document(pki, None)))
    assert exc.value.response["Error"]["Code"] == "ValidationException"

    ec_der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    doc = Nsm(LocalNsmDevice(pki, pcrs=GOOD_PCRS)).attestation(public_key=ec_der)
    with pytest.raises(ClientError) as exc:
        enclave.generate_random(NumberOfBytes=16, Recipient=recipient(doc))
    assert exc.value.response["Error"]["Code"] == "ValidationException"
