"""The KMS emulator over TLS (KmsTls, the CLI's --tls-cert/--tls-key), DryRun, account and region scoping."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nitrovault.local.kms import KmsEmulator, KmsTls, parse_principals

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
REGION = "us-east-1"
OTHER_REGION = "eu-west-1"
SESSION = boto3.session.Session()
PRINCIPALS = {
    "AKIDADMIN": {"secret": "admin-secret", "arn": f"arn:aws:iam::{ACCOUNT}:role/admin"},
    "AKIDOTHER": {"secret": "other-secret", "arn": f"arn:aws:iam::{OTHER_ACCOUNT}:role/other"},
}
DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."


def _sans(path: Path) -> tuple[set[str], set[Any]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(ext.get_values_for_type(x509.IPAddress))


# -- KmsTls --------------------------------------------------------------------------------------------------


def test_ensure_makes_files_with_private_keys_and_regional_names(tmp_path: Path) -> None:
    tls = KmsTls.ensure(tmp_path / "tls", [REGION, "cn-north-1"])
    for path, mode in [(tls.ca_path, 0o644), (tls.directory / "ca.key", 0o600), (tls.cert_path, 0o644),
                       (tls.key_path, 0o600)]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert tls.ca_pem == tls.ca_path.read_bytes()
    dns, ips = _sans(tls.cert_path)
    assert dns == {"kms.us-east-1.amazonaws.com", "kms.cn-north-1.amazonaws.com.cn", "localhost"}
    assert ips == {ipaddress.ip_address("127.0.0.1")}
    cert = x509.load_pem_x509_certificate(tls.cert_path.read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(tls.ca_pem))
    assert tls.server_context().minimum_version == ssl.TLSVersion.TLSv1_2


def test_ensure_reuses_while_valid_and_reissues_when_needed(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    first = KmsTls.ensure(d, [REGION])
    server1 = first.cert_path.read_bytes()
    again = KmsTls.ensure(d, [REGION])
    assert again.ca_pem == first.ca_pem and again.cert_path.read_bytes() == server1

    wider = KmsTls.ensure(d, [REGION, OTHER_REGION])  # a region not covered: new server cert, same CA
    assert wider.ca_pem == first.ca_pem and wider.cert_path.read_bytes() != server1
    assert "kms.eu-west-1.amazonaws.com" in _sans(wider.cert_path)[0]
    server2 = wider.cert_path.read_bytes()
    assert KmsTls.ensure(d, [OTHER_REGION]).cert_path.read_bytes() == server2  # a subset is covered

    late = datetime.now(UTC) + timedelta(days=340)  # < 30 days left on the server certificate
    renewed = KmsTls.ensure(d, [REGION], now=late)
    assert renewed.ca_pem == first.ca_pem and renewed.cert_path.read_bytes() != server2

    (d / "server.key").write_bytes(b"garbage")  # unreadable key: reissued
    KmsTls.ensure(d, [REGION]).server_context()

    very_late = datetime.now(UTC) + timedelta(days=3640)  # the CA itself is near its end
    assert KmsTls.ensure(d, [REGION], now=very_late).ca_pem != first.ca_pem


def test_ensure_refuses_a_bare_string(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="sequence"):
        KmsTls.ensure(tmp_path / "tls", REGION)


# -- the emulator over TLS -----------------------------------------------------------------------------------


class Box:
    def __init__(self, tmp_path: Path, regions: list[str] | None) -> None:
        self.tls = KmsTls.ensure(tmp_path / "tls", [REGION, OTHER_REGION])
        self.emulator = KmsEmulator(tmp_path / "state", None, parse_principals(PRINCIPALS), regions)
        self.running = self.emulator.serve("127.0.0.1", 0, tls=self.tls.server_context())
        self.url = self.running.endpoint_url

    def client(self, akid: str = "AKIDADMIN", region: str = REGION) -> Any:
        return SESSION.client(
            "kms", endpoint_url=self.url, region_name=region, aws_access_key_id=akid,
            aws_secret_access_key=PRINCIPALS[akid]["secret"], verify=str(self.tls.ca_path),
            config=Config(retries={"max_attempts": 1}))


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(tmp_path, None)
    yield b
    b.emulator.shutdown()


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_boto3_over_tls_verifies_against_the_ca(box: Box) -> None:
    assert box.url.startswith("https://127.0.0.1:")
    c = box.client()
    key = c.create_key()["KeyMetadata"]["KeyId"]
    blob = c.encrypt(KeyId=key, Plaintext=b"over tls")["CiphertextBlob"]
    assert c.decrypt(CiphertextBlob=blob)["Plaintext"] == b"over tls"
    untrusted = SESSION.client("kms", endpoint_url=box.url, region_name=REGION, aws_access_key_id="AKIDADMIN",
                               aws_secret_access_key="admin-secret", verify=True,
                               config=Config(retries={"max_attempts": 1}))
    with pytest.raises(Exception, match=r"(?i)certificate|ssl"):
        untrusted.list_keys()


def test_real_kms_host_name_verifies_via_sni(box: Box) -> None:
    ctx = ssl.create_default_context(cafile=str(box.tls.ca_path))
    with socket.create_connection(("127.0.0.1", box.running.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="kms.eu-west-1.amazonaws.com") as tls:
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    with socket.create_connection(("127.0.0.1", box.running.port)) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw, server_hostname="kms.ap-south-1.amazonaws.com")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(box: Box) -> None:
    ctx = ssl.create_default_context(cafile=str(box.tls.ca_path))
    ctx.options |= ssl.OP_NO_TLSv1_2 | ssl.OP_NO_TLSv1_3  # offer only TLS 1.0 and 1.1
    with socket.create_connection(("127.0.0.1", box.running.port)) as raw, \
            pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="localhost")


def test_garbage_and_stalled_clients_block_nobody(box: Box) -> None:
    stalled = socket.create_connection(("127.0.0.1", box.running.port))  # sends nothing
    half = socket.create_connection(("127.0.0.1", box.running.port))
    half.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, then silence
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", box.running.port)) as junk:
                junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
                with contextlib.suppress(ConnectionResetError):  # blocks until the server answers
                    junk.recv(100)  # the server answers an alert and closes; it must not hang
        c = box.client()  # while two handshakes hang, others are served
        assert c.generate_random(NumberOfBytes=8)["Plaintext"]
    finally:
        stalled.close()
        half.close()
    assert box.client().list_keys()["Keys"] == []


def test_cli_serves_https_with_tls_flags(tmp_path: Path) -> None:
    from nitrovault.local.pki import LocalPki

    pki = LocalPki.ensure(tmp_path / "pki")
    tls = KmsTls.ensure(tmp_path / "tls", [REGION])
    principals = tmp_path / "principals.json"
    principals.write_text(json.dumps(PRINCIPALS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base = [sys.executable, "-m", "nitrovault", "local", "kms", "--port", "0", "--state-dir",
            str(tmp_path / "state"), "--root", str(pki.root_path), "--principals", str(principals)]
    only_cert = subprocess.run([*base, "--tls-cert", str(tls.cert_path)], capture_output=True, text=True,
                               env=env, timeout=60)
    assert only_cert.returncode == 2
    proc = subprocess.Popen([*base, "--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert "listening on https://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[1]
        c = boto3.client("kms", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIDADMIN",
                         aws_secret_access_key="admin-secret", verify=str(tls.ca_path))
        assert c.list_keys()["Keys"] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


# -- DryRun --------------------------------------------------------------------------------------------------


def test_dry_run_answers_412_and_does_nothing(box: Box) -> None:
    c = box.client()
    key = c.create_key()["KeyMetadata"]["Arn"]
    blob = c.encrypt(KeyId=key, Plaintext=b"p", EncryptionContext={"a": "b"})["CiphertextBlob"]
    calls = {
        "encrypt": {"KeyId": key, "Plaintext": b"p"},
        "decrypt": {"CiphertextBlob": blob, "EncryptionContext": {"a": "b"}},
        "generate_data_key": {"KeyId": key, "KeySpec": "AES_256"},
        "generate_data_key_without_plaintext": {"KeyId": key, "NumberOfBytes": 16},
        "re_encrypt": {"CiphertextBlob": blob, "SourceEncryptionContext": {"a": "b"},
                       "DestinationKeyId": key},
    }
    for name, args in calls.items():
        with pytest.raises(ClientError) as exc:
            getattr(c, name)(DryRun=True, **args)
        assert code(exc) == "DryRunOperationException", name
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        assert exc.value.response["Error"]["Message"] == DRY_RUN_MESSAGE
        assert "Plaintext" not in exc.value.response and "CiphertextBlob" not in exc.value.response
        getattr(c, name)(DryRun=False, **args)  # and without it, the call works


def test_dry_run_of_a_failing_request_is_the_real_error(box: Box) -> None:
    c = box.client()
    key = c.create_key()["KeyMetadata"]["Arn"]
    blob = c.encrypt(KeyId=key, Plaintext=b"p", EncryptionContext={"a": "b"})["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:  # wrong context
        c.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "x"}, DryRun=True)
    assert code(exc) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as exc:  # no such key
        c.encrypt(KeyId="00000000-0000-4000-8000-000000000000", Plaintext=b"p", DryRun=True)
    assert code(exc) == "NotFoundException"
    with pytest.raises(ClientError) as exc:  # policy denies another account
        box.client("AKIDOTHER").encrypt(KeyId=key, Plaintext=b"p", DryRun=True)
    assert code(exc) == "AccessDeniedException"
    c.disable_key(KeyId=key)
    with pytest.raises(ClientError) as exc:
        c.generate_data_key(KeyId=key, NumberOfBytes=32, DryRun=True)
    assert code(exc) == "DisabledException"


# -- accounts and regions ------------------------------------------------------------------------------------


def test_keys_and_aliases_are_regional(box: Box) -> None:
    east, west = box.client(), box.client(region=OTHER_REGION)
    key = east.create_key()["KeyMetadata"]
    assert key["Arn"].startswith(f"arn:aws:kms:{REGION}:{ACCOUNT}:key/")
    east.create_alias(AliasName="alias/model", TargetKeyId=key["KeyId"])
    assert west.list_keys()["Keys"] == [] and west.list_aliases()["Aliases"] == []
    for ref in (key["KeyId"], key["Arn"], "alias/model", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/model"):
        with pytest.raises(ClientError) as exc:
            west.describe_key(KeyId=ref)
        assert code(exc) == "NotFoundException", ref
    with pytest.raises(ClientError) as exc:
        west.encrypt(KeyId=key["KeyId"], Plaintext=b"p")
    assert code(exc) == "NotFoundException"
    blob = east.encrypt(KeyId="alias/model", Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as exc:
        west.decrypt(CiphertextBlob=blob)
    assert code(exc) == "InvalidCiphertextException"

    west_key = west.create_key()["KeyMetadata"]  # the same alias name, another region, another key
    assert west_key["Arn"].startswith(f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:key/")
    west.create_alias(AliasName="alias/model", TargetKeyId=west_key["KeyId"])
    assert west.describe_key(KeyId="alias/model")["KeyMetadata"]["KeyId"] == west_key["KeyId"]
    assert east.describe_key(KeyId="alias/model")["KeyMetadata"]["KeyId"] == key["KeyId"]
    with pytest.raises(ClientError) as exc:  # an alias only points at a key of its own region
        east.create_alias(AliasName="alias/cross", TargetKeyId=west_key["Arn"])
    assert code(exc) == "NotFoundException"


def test_another_accounts_key_needs_its_arn(box: Box) -> None:
    admin, other = box.client(), box.client("AKIDOTHER")
    shared_policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*",
         "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": PRINCIPALS["AKIDOTHER"]["arn"]},
         "Action": ["kms:Encrypt", "kms:DescribeKey"], "Resource": "*"}]})
    shared = admin.create_key(Policy=shared_policy)["KeyMetadata"]
    admin.create_alias(AliasName="alias/shared", TargetKeyId=shared["KeyId"])
    private = admin.create_key()["KeyMetadata"]

    for ref in (shared["KeyId"], "alias/shared"):  # bare references name the caller's own account
        with pytest.raises(ClientError) as exc:
            other.encrypt(KeyId=ref, Plaintext=b"p")
        assert code(exc) == "NotFoundException", ref
        assert ACCOUNT not in exc.value.response["Error"]["Message"]
    other.encrypt(KeyId=shared["Arn"], Plaintext=b"p")
    other.encrypt(KeyId=f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/shared", Plaintext=b"p")
    assert shared["KeyId"] not in [k["KeyId"] for k in other.list_keys()["Keys"]]

    with pytest.raises(ClientError) as exc:
        other.encrypt(KeyId=private["Arn"], Plaintext=b"p")
    assert code(exc) == "AccessDeniedException"
    message = exc.value.response["Error"]["Message"]
    assert message == (f"User: {PRINCIPALS['AKIDOTHER']['arn']} is not authorized to perform: kms:Encrypt "
                       f"on resource: {private['Arn']} because no resource-based policy allows the "
                       "kms:Encrypt action")


def test_legacy_state_without_region_is_migrated(tmp_path: Path) -> None:
    first = Box(tmp_path, None)
    west = first.client(region=OTHER_REGION)
    key = west.create_key()["KeyMetadata"]
    west.create_alias(AliasName="alias/old", TargetKeyId=key["KeyId"])
    east_key = first.client().create_key()["KeyMetadata"]
    first.emulator.shutdown()
    for path in (tmp_path / "state" / "keys").glob("*.json"):  # older files: no region field
        record = json.loads(path.read_text())
        del record["region"]
        if record["key_id"] == east_key["KeyId"]:  # and one whose ARN does not say either
            del record["arn"]
        path.write_text(json.dumps(record))
    (tmp_path / "state" / "aliases.json").write_text(  # format 1: not regional
        json.dumps({"alias/old": {"key_id": key["KeyId"], "created": 0}}))
    second = Box(tmp_path, None)
    try:
        assert second.client(region=OTHER_REGION).describe_key(KeyId="alias/old")["KeyMetadata"]["Arn"] \
            == key["Arn"]
        with pytest.raises(ClientError):
            second.client().describe_key(KeyId="alias/old")
        assert second.client().describe_key(KeyId=east_key["KeyId"])["KeyMetadata"]["Arn"] == east_key["Arn"]
    finally:
        second.emulator.shutdown()


def test_dry_run_with_recipient_releases_nothing(tmp_path: Path) -> None:
    from nitrovault.kms import RecipientKey
    from nitrovault.local.nsm import LocalNsmDevice
    from nitrovault.local.pki import LocalPki
    from nitrovault.nsm import Nsm

    pki = LocalPki.ensure(tmp_path / "pki")
    key = RecipientKey.generate()
    emulator = KmsEmulator(tmp_path / "state", pki.root, parse_principals(PRINCIPALS), REGION)
    url = emulator.serve("127.0.0.1", 0).endpoint_url
    try:
        c = SESSION.client("kms", endpoint_url=url, region_name=REGION, aws_access_key_id="AKIDADMIN",
                           aws_secret_access_key="admin-secret", config=Config(retries={"max_attempts": 1}))
        arn = c.create_key()["KeyMetadata"]["Arn"]
        blob = c.encrypt(KeyId=arn, Plaintext=b"k" * 32)["CiphertextBlob"]
        good = Nsm(LocalNsmDevice(pki, pcrs={0: b"\xa0" * 48})).attestation(public_key=key.public_key_der)
        for call, args in [(c.decrypt, {"CiphertextBlob": blob}),
                           (c.generate_data_key, {"KeyId": arn, "NumberOfBytes": 32})]:
            rec = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": good}
            with pytest.raises(ClientError) as exc:
                call(Recipient=rec, DryRun=True, **args)
            assert code(exc) == "DryRunOperationException"
            assert "CiphertextForRecipient" not in exc.value.response
            assert call(Recipient=rec, **args)["CiphertextForRecipient"]
            with pytest.raises(ClientError) as exc:  # a bad document is the real error, not a dry run
                call(Recipient={**rec, "AttestationDocument": good[:-8] + b"\0" * 8}, DryRun=True, **args)
            assert code(exc) == "AccessDeniedException"
    finally:
        emulator.shutdown()
