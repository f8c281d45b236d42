"""The KMS emulator driven by an unmodified boto3 client over HTTP (and once through the CLI)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from fakes import FakeClock

from nitrovault.local.kms import KmsEmulator, parse_principals

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
SESSION = boto3.session.Session()  # one session: its model loader is cached across clients
REGION = "us-east-1"
PRINCIPALS = {
    "AKIDADMIN": {"secret": "admin-secret", "arn": f"arn:aws:iam::{ACCOUNT}:role/admin"},
    "AKIDALICE": {"secret": "alice-secret", "arn": f"arn:aws:iam::{ACCOUNT}:role/alice"},
    "AKIDBOB": {"secret": "bob-secret", "arn": f"arn:aws:iam::{ACCOUNT}:role/bob"},
    "AKIDOTHER": {"secret": "other-secret", "arn": f"arn:aws:iam::{OTHER_ACCOUNT}:role/other"},
}


@dataclass
class Kms:
    state_dir: Path
    clock: FakeClock  # shared by the emulator and botocore's signer (so SigV4 agrees with the emulator)
    audit: list[dict[str, Any]]
    emulator: KmsEmulator
    url: str

    def client(self, akid: str = "AKIDADMIN", secret: str | None = None) -> Any:
        return SESSION.client(
            "kms", endpoint_url=self.url, region_name=REGION, aws_access_key_id=akid,
            aws_secret_access_key=secret if secret is not None else PRINCIPALS[akid]["secret"],
            config=Config(retries={"max_attempts": 1}),
        )

    def restart(self) -> None:
        self.emulator.shutdown()
        self.emulator = make_emulator(self.state_dir, self.clock, self.audit)
        self.url = self.emulator.serve("127.0.0.1", 0).endpoint_url


def make_emulator(state_dir: Path, clock: Callable[[], datetime], audit: list[dict[str, Any]]) -> KmsEmulator:
    return KmsEmulator(state_dir, None, parse_principals(PRINCIPALS), REGION, clock=clock,
                       audit=audit.append)


@pytest.fixture
def kms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kms]:
    clock = FakeClock()
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: clock().replace(tzinfo=None))
    audit: list[dict[str, Any]] = []
    emulator = make_emulator(tmp_path / "state", clock, audit)
    running = emulator.serve("127.0.0.1", 0)
    box = Kms(tmp_path / "state", clock, audit, emulator, running.endpoint_url)
    yield box
    box.emulator.shutdown()


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def policy(*statements: dict[str, Any]) -> str:
    admin = {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": PRINCIPALS["AKIDADMIN"]["arn"]},
             "Action": "kms:*", "Resource": "*"}
    return json.dumps({"Version": "2012-10-17", "Statement": [admin, *statements]})


# -- every operation -----------------------------------------------------------------------------------------


def test_every_operation_through_boto3(kms: Kms) -> None:
    c = kms.client()
    meta = c.create_key(Description="model key", KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]
    key_id, arn = meta["KeyId"], meta["Arn"]
    assert arn == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    assert meta["KeyState"] == "Enabled" and meta["Enabled"] and meta["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert meta["AWSAccountId"] == ACCOUNT and meta["Description"] == "model key"
    assert isinstance(meta["CreationDate"], datetime)

    assert c.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"] == key_id
    assert {"KeyId": key_id, "KeyArn": arn} in c.list_keys()["Keys"]

    c.create_alias(AliasName="alias/model", TargetKeyId=key_id)
    aliases = c.list_aliases(KeyId=key_id)["Aliases"]
    assert [(a["AliasName"], a["TargetKeyId"]) for a in aliases] == [("alias/model", key_id)]
    assert aliases[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/model"
    assert c.describe_key(KeyId="alias/model")["KeyMetadata"]["KeyId"] == key_id

    default = json.loads(c.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    assert default["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    c.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy())
    assert json.loads(c.get_key_policy(KeyId=key_id)["Policy"])["Statement"][0]["Sid"] == "Admin"

    ctx = {"model": "m1", "version": "3"}
    enc = c.encrypt(KeyId="alias/model", Plaintext=b"secret bytes", EncryptionContext=ctx)
    assert enc["KeyId"] == arn and enc["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    dec = c.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=ctx)  # no KeyId: from the blob
    assert dec["Plaintext"] == b"secret bytes" and dec["KeyId"] == arn
    assert "CiphertextForRecipient" not in dec

    other = c.create_key()["KeyMetadata"]["Arn"]
    re = c.re_encrypt(CiphertextBlob=enc["CiphertextBlob"], SourceEncryptionContext=ctx,
                      DestinationKeyId=other, DestinationEncryptionContext={"x": "y"})
    assert re["SourceKeyId"] == arn and re["KeyId"] == other
    assert c.decrypt(CiphertextBlob=re["CiphertextBlob"], EncryptionContext={"x": "y"})["Plaintext"] \
        == b"secret bytes"

    dk = c.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=ctx)
    assert len(dk["Plaintext"]) == 32 and dk["KeyId"] == arn
    again = c.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=ctx)
    assert again["Plaintext"] == dk["Plaintext"]
    dk16 = c.generate_data_key(KeyId=key_id, NumberOfBytes=16)
    assert len(dk16["Plaintext"]) == 16
    wp = c.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_128", EncryptionContext=ctx)
    assert "Plaintext" not in wp
    assert len(c.decrypt(CiphertextBlob=wp["CiphertextBlob"], EncryptionContext=ctx)["Plaintext"]) == 16

    rand = c.generate_random(NumberOfBytes=64)["Plaintext"]
    assert len(rand) == 64 and rand != c.generate_random(NumberOfBytes=64)["Plaintext"]

    assert c.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False
    c.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=90)
    status = c.get_key_rotation_status(KeyId=key_id)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 90
    c.disable_key_rotation(KeyId=key_id)
    assert c.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is False

    c.disable_key(KeyId=key_id)
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    c.enable_key(KeyId=key_id)
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"] is True

    sched = c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert sched["KeyState"] == "PendingDeletion" and sched["PendingWindowInDays"] == 7
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert c.cancel_key_deletion(KeyId=key_id)["KeyId"] == arn
    assert c.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"  # as in AWS


def test_validation_errors_use_kms_codes(kms: Kms) -> None:
    c = kms.client()
    key_id = c.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as exc:
        c.generate_data_key(KeyId=key_id)  # neither NumberOfBytes nor KeySpec
    assert error_code(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        c.create_key(KeySpec="RSA_2048")
    assert error_code(exc) == "UnsupportedOperationException"
    with pytest.raises(ClientError) as exc:
        c.put_key_policy(KeyId=key_id, Policy="{not json")
    assert error_code(exc) == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as exc:
        c.create_alias(AliasName="alias/aws/reserved", TargetKeyId=key_id)
    assert error_code(exc) == "InvalidAliasNameException"
    c.create_alias(AliasName="alias/once", TargetKeyId=key_id)
    with pytest.raises(ClientError) as exc:
        c.create_alias(AliasName="alias/once", TargetKeyId=key_id)
    assert error_code(exc) == "AlreadyExistsException"
    with pytest.raises(ClientError) as exc:
        c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=3)
    assert error_code(exc) == "ValidationException"


# -- authorisation -------------------------------------------------------------------------------------------


def test_policy_allows_named_principal_with_matching_encryption_context(kms: Kms) -> None:
    admin = kms.client()
    key = admin.create_key(Policy=policy({
        "Sid": "AliceWithContext", "Effect": "Allow",
        "Principal": {"AWS": PRINCIPALS["AKIDALICE"]["arn"]},
        "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
        "Condition": {"StringEquals": {"kms:EncryptionContext:model": "m1"}},
    }))["KeyMetadata"]["Arn"]
    alice, bob = kms.client("AKIDALICE"), kms.client("AKIDBOB")

    blob = alice.encrypt(KeyId=key, Plaintext=b"p", EncryptionContext={"model": "m1"})["CiphertextBlob"]
    assert alice.decrypt(CiphertextBlob=blob, EncryptionContext={"model": "m1"})["Plaintext"] == b"p"

    with pytest.raises(ClientError) as exc:  # the principal is not named
        bob.decrypt(CiphertextBlob=blob, EncryptionContext={"model": "m1"})
    assert error_code(exc) == "AccessDeniedException"
    assert exc.value.response["Error"]["Message"] == (
        f"User: {PRINCIPALS['AKIDBOB']['arn']} is not authorized to perform: kms:Decrypt on resource: "
        f"{key} because no resource-based policy allows the kms:Decrypt action")

    with pytest.raises(ClientError) as exc:  # the condition on the encryption context fails
        alice.encrypt(KeyId=key, Plaintext=b"p", EncryptionContext={"model": "m2"})
    assert error_code(exc) == "AccessDeniedException"
    with pytest.raises(ClientError) as exc:  # the action is not granted
        alice.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext={"model": "m1"})
    assert error_code(exc) == "AccessDeniedException"


def test_explicit_deny_wins_and_is_named(kms: Kms) -> None:
    admin = kms.client()
    key = admin.create_key(Policy=policy({
        "Sid": "NoDecrypt", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
    }))["KeyMetadata"]["Arn"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        admin.decrypt(CiphertextBlob=blob)
    assert error_code(exc) == "AccessDeniedException"
    assert "explicit deny" in exc.value.response["Error"]["Message"]


def test_keys_belong_to_the_callers_account(kms: Kms) -> None:
    mine = kms.client().create_key()["KeyMetadata"]
    other = kms.client("AKIDOTHER")
    theirs = other.create_key()["KeyMetadata"]
    assert theirs["AWSAccountId"] == OTHER_ACCOUNT and theirs["Arn"].split(":")[4] == OTHER_ACCOUNT
    assert mine["KeyId"] not in [k["KeyId"] for k in other.list_keys()["Keys"]]
    with pytest.raises(ClientError) as exc:  # the default policy only trusts the key's own account
        other.encrypt(KeyId=mine["Arn"], Plaintext=b"p")
    assert error_code(exc) == "AccessDeniedException"


# -- SigV4 ---------------------------------------------------------------------------------------------------


def test_bad_signature_is_rejected(kms: Kms) -> None:
    with pytest.raises(ClientError) as exc:
        kms.client("AKIDADMIN", secret="wrong-secret").list_keys()
    assert error_code(exc) == "InvalidSignatureException"


def test_unknown_access_key_is_rejected(kms: Kms) -> None:
    with pytest.raises(ClientError) as exc:
        kms.client("AKIDNOBODY", secret="x").list_keys()
    assert error_code(exc) == "UnrecognizedClientException"
    assert exc.value.response["Error"]["Message"] == "The security token included in the request is invalid."


def test_stale_signature_is_rejected(kms: Kms, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: (kms.clock() - timedelta(minutes=16)).replace(tzinfo=None))
    with pytest.raises(ClientError) as exc:
        kms.client().list_keys()
    assert error_code(exc) == "InvalidSignatureException"
    assert "Signature expired" in exc.value.response["Error"]["Message"]


def test_session_token_is_accepted(kms: Kms) -> None:
    c = boto3.client("kms", endpoint_url=kms.url, region_name=REGION, aws_access_key_id="AKIDADMIN",
                     aws_secret_access_key="admin-secret", aws_session_token="session-token-value")
    assert "Keys" in c.list_keys()


# -- ciphertexts and key states ------------------------------------------------------------------------------


def test_unknown_key_id_is_not_found(kms: Kms) -> None:
    c = kms.client()
    for ref in ("00000000-0000-4000-8000-000000000000", "alias/missing",
                f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-4000-8000-000000000000"):
        with pytest.raises(ClientError) as exc:
            c.encrypt(KeyId=ref, Plaintext=b"p")
        assert error_code(exc) == "NotFoundException", ref


def test_wrong_encryption_context_is_invalid_ciphertext(kms: Kms) -> None:
    c = kms.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    blob = c.encrypt(KeyId=key, Plaintext=b"p", EncryptionContext={"model": "m1"})["CiphertextBlob"]
    for ctx in ({"model": "m2"}, {}, {"model": "m1", "extra": "x"}):
        with pytest.raises(ClientError) as exc:
            c.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
        assert error_code(exc) == "InvalidCiphertextException", ctx


def test_tampered_blob_is_invalid_ciphertext(kms: Kms) -> None:
    c = kms.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    blob = bytearray(c.encrypt(KeyId=key, Plaintext=b"plaintext")["CiphertextBlob"])
    for index in (len(blob) - 1, 30, 1):  # tag, nonce, key id
        bad = bytearray(blob)
        bad[index] ^= 1
        with pytest.raises(ClientError) as exc:
            c.decrypt(CiphertextBlob=bytes(bad))
        assert error_code(exc) == "InvalidCiphertextException", index


def test_key_id_other_than_the_blobs_is_incorrect_key(kms: Kms) -> None:
    c = kms.client()
    key, other = (c.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    blob = c.encrypt(KeyId=key, Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        c.decrypt(CiphertextBlob=blob, KeyId=other)
    assert error_code(exc) == "IncorrectKeyException"
    assert c.decrypt(CiphertextBlob=blob, KeyId=key)["Plaintext"] == b"p"


def test_disabled_and_pending_deletion_keys_refuse_crypto(kms: Kms) -> None:
    c = kms.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    blob = c.encrypt(KeyId=key, Plaintext=b"p")["CiphertextBlob"]
    c.disable_key(KeyId=key)
    with pytest.raises(ClientError) as exc:
        c.decrypt(CiphertextBlob=blob)
    assert error_code(exc) == "DisabledException"
    with pytest.raises(ClientError) as exc:
        c.generate_data_key(KeyId=key, KeySpec="AES_256")
    assert error_code(exc) == "DisabledException"
    c.enable_key(KeyId=key)
    c.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    with pytest.raises(ClientError) as exc:
        c.decrypt(CiphertextBlob=blob)
    assert error_code(exc) == "KMSInvalidStateException"
    with pytest.raises(ClientError) as exc:
        c.enable_key(KeyId=key)
    assert error_code(exc) == "KMSInvalidStateException"


def test_deletion_happens_when_the_window_ends(kms: Kms) -> None:
    c = kms.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    c.create_alias(AliasName="alias/doomed", TargetKeyId=key)
    c.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    kms.clock.advance(timedelta(days=7, minutes=1))
    with pytest.raises(ClientError) as exc:
        c.describe_key(KeyId=key)
    assert error_code(exc) == "NotFoundException"
    assert c.list_aliases()["Aliases"] == []
    assert not (kms.state_dir / "keys" / f"{key}.json").exists()


def test_rotation_keeps_old_blobs_decryptable(kms: Kms) -> None:
    c = kms.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    before = c.encrypt(KeyId=key, Plaintext=b"old")["CiphertextBlob"]
    c.rotate_key_on_demand(KeyId=key)
    after = c.encrypt(KeyId=key, Plaintext=b"new")["CiphertextBlob"]
    assert before[17:21] == (0).to_bytes(4, "big") and after[17:21] == (1).to_bytes(4, "big")
    c.enable_key_rotation(KeyId=key, RotationPeriodInDays=90)
    kms.clock.advance(timedelta(days=91))  # automatic rotation is due
    latest = c.encrypt(KeyId=key, Plaintext=b"newest")["CiphertextBlob"]
    assert latest[17:21] == (2).to_bytes(4, "big")
    for blob, plain in ((before, b"old"), (after, b"new"), (latest, b"newest")):
        assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == plain


def test_state_survives_restart_with_private_permissions(kms: Kms) -> None:
    c = kms.client()
    pol = policy({"Sid": "Alice", "Effect": "Allow", "Principal": {"AWS": PRINCIPALS["AKIDALICE"]["arn"]},
                  "Action": "kms:Decrypt", "Resource": "*"})
    key = c.create_key(Policy=pol)["KeyMetadata"]["KeyId"]
    c.create_alias(AliasName="alias/kept", TargetKeyId=key)
    c.rotate_key_on_demand(KeyId=key)
    blob = c.encrypt(KeyId="alias/kept", Plaintext=b"persist", EncryptionContext={"a": "b"})["CiphertextBlob"]
    c.disable_key(KeyId=key)

    kms.restart()
    c = kms.client()
    assert c.describe_key(KeyId="alias/kept")["KeyMetadata"]["KeyState"] == "Disabled"
    assert c.get_key_policy(KeyId=key)["Policy"] == pol
    c.enable_key(KeyId=key)
    assert kms.client("AKIDALICE").decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})["Plaintext"] \
        == b"persist"
    with pytest.raises(ClientError):
        kms.client("AKIDBOB").decrypt(CiphertextBlob=blob, EncryptionContext={"a": "b"})

    assert stat.S_IMODE(kms.state_dir.stat().st_mode) == 0o700
    files = [p for p in kms.state_dir.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not [p for p in files if p.name.endswith(".tmp")]


# -- the HTTP edge -------------------------------------------------------------------------------------------


def _raw_post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("POST", "/")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_oversized_body_is_refused_unread(kms: Kms) -> None:
    headers = {"Content-Length": str(2 << 20), "X-Amz-Target": "TrentService.ListKeys"}
    status, body = _raw_post(kms.url, headers, b"")
    assert status == 413 and body["__type"] == "ValidationException"


def test_unsigned_request_is_refused(kms: Kms) -> None:
    status, body = _raw_post(kms.url, {"Content-Length": "2", "X-Amz-Target": "TrentService.ListKeys",
                                       "Content-Type": "application/x-amz-json-1.1"}, b"{}")
    assert status == 400 and body["__type"] == "MissingAuthenticationTokenException"


def test_internal_error_hides_details(kms: Kms, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: Any) -> None:
        raise RuntimeError("internal detail: key material 0xdeadbeef")

    monkeypatch.setattr(kms.emulator.operations, "list_keys", boom)
    monkeypatch.setitem(kms.emulator.operations._handlers, "ListKeys", boom)
    with pytest.raises(ClientError) as exc:
        kms.client().list_keys()
    assert error_code(exc) == "KMSInternalException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert "deadbeef" not in json.dumps(exc.value.response, default=str)


def test_unknown_operation(kms: Kms) -> None:
    with pytest.raises(ClientError) as exc:
        kms.client().list_grants(KeyId="00000000-0000-4000-8000-000000000000")
    assert error_code(exc) == "UnknownOperationException"


# -- the CLI, as a real process ------------------------------------------------------------------------------


def test_cli_serves_boto3_and_stops_on_sigterm(tmp_path: Path) -> None:
    from nitrovault.local.pki import LocalPki

    pki = LocalPki.ensure(tmp_path / "pki")
    principals = tmp_path / "principals.json"
    principals.write_text(json.dumps(PRINCIPALS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nitrovault", "local", "kms", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", str(tmp_path / "state"), "--root", str(pki.root_path),
         "--principals", str(principals), "--region", REGION],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("kms emulator listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        c = boto3.client("kms", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIDADMIN",
                         aws_secret_access_key="admin-secret")
        key = c.create_key()["KeyMetadata"]["KeyId"]
        blob = c.encrypt(KeyId=key, Plaintext=b"via cli")["CiphertextBlob"]
        assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == b"via cli"
        with pytest.raises(ClientError) as exc:  # --region is enforced
            boto3.client("kms", endpoint_url=url, region_name="eu-west-1", aws_access_key_id="AKIDADMIN",
                         aws_secret_access_key="admin-secret").list_keys()
        assert error_code(exc) == "InvalidSignatureException"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "admin-secret" not in err
    assert base64.b64encode(b"via cli").decode() not in err
