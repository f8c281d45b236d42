"""``nitrovault local attest`` in process: it writes a document that ``nitrovault attest verify`` accepts
against the local root, with PCR0/1/2 measured from this checkout unless ``--pcr`` overrides them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from nitrovault.attestation import Expectations, load_root, verify_document
from nitrovault.cli import app
from nitrovault.cli.local_attest import repo_root
from nitrovault.local.measure import default_lock_file, measure_enclave

runner = CliRunner()
AT = "2025-06-01T10:00:00+00:00"
PCR7 = "07" * 48


@pytest.fixture(scope="module")
def public_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pk") / "pk.der"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()  # any DER SPKI will do; EC is fast
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    path.write_bytes(key.public_bytes(serialization.Encoding.DER, spki))
    return path


def run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_writes_a_verifiable_document_with_measured_pcrs(tmp_path: Path, public_key_file: Path) -> None:
    pki, out = tmp_path / "pki", tmp_path / "doc.cose"
    (tmp_path / "ud").write_bytes(b"user-data")
    code, output = run("local", "attest", "--pki-dir", pki, "--public-key-file", public_key_file,
                       "--user-data-file", tmp_path / "ud", "--nonce", "c0ffee", "--pcr", f"7={PCR7}",
                       "--at", AT, "-o", out)
    assert code == 0, output
    assert (pki / "root.pem").is_file()
    measured = measure_enclave(repo_root(), default_lock_file(repo_root()))
    root = load_root(pki / "root.pem")
    verified = verify_document(out.read_bytes(), at=datetime.fromisoformat(AT), root=root,
                               expect=Expectations(pcrs={**measured.as_pcrs(), 7: bytes.fromhex(PCR7)},
                                                   nonce=bytes.fromhex("c0ffee"), user_data=b"user-data",
                                                   public_key=public_key_file.read_bytes()))
    assert verified.document.timestamp == datetime.fromisoformat(AT).astimezone(UTC)

    # The same document through the verify command, pinned to the document time, with the expected PCR.
    code, output = run("attest", "verify", out, "--root", pki / "root.pem", "--at", AT,
                       "--expect-pcr", f"0={measured.pcr0.hex()}", "--expect-pcr", f"7={PCR7}")
    assert code == 0, output
    code, output = run("attest", "verify", out, "--root", pki / "root.pem", "--at", AT,
                       "--expect-pcr", f"0={'ab' * 48}")
    assert code == 1, output


def test_pcr_overrides_replace_measured_values_and_the_pki_is_reused(tmp_path: Path,
                                                                     public_key_file: Path) -> None:
    pki = tmp_path / "pki"
    values = {0: "a0" * 48, 1: "a1" * 48, 2: "a2" * 48}
    args = [a for i, v in values.items() for a in ("--pcr", f"{i}={v}")]
    assert run("local", "attest", "--pki-dir", pki, "--public-key-file", public_key_file, *args,
               "-o", tmp_path / "a")[0] == 0
    root_before = (pki / "root.pem").read_bytes()
    assert run("local", "attest", "--pki-dir", pki, "--public-key-file", public_key_file, *args,
               "-o", tmp_path / "b")[0] == 0
    assert (pki / "root.pem").read_bytes() == root_before
    payload = cbor2.loads(cbor2.loads((tmp_path / "b").read_bytes())[2])
    assert {i: payload["pcrs"][i].hex() for i in values} == values
    # Without --at it is "now": verifies now against the same root.
    verify_document((tmp_path / "b").read_bytes(), at=datetime.now(UTC), root=load_root(pki / "root.pem"))


def test_another_root_does_not_verify(tmp_path: Path, public_key_file: Path) -> None:
    out = tmp_path / "doc"
    assert run("local", "attest", "--pki-dir", tmp_path / "one", "--public-key-file", public_key_file,
               "--at", AT, "-o", out)[0] == 0
    assert run("local", "attest", "--pki-dir", tmp_path / "two", "--public-key-file", public_key_file,
               "--at", AT, "-o", tmp_path / "unused")[0] == 0
    code, output = run("attest", "verify", out, "--root", tmp_path / "two" / "root.pem", "--at", AT)
    assert code == 1, output


@pytest.mark.parametrize(
    "bad",
    [
        ["--pcr", "0=abcd"],                    # wrong length
        ["--pcr", f"16={'00' * 48}"],           # not a boot PCR
        ["--pcr", "zero"],                      # not N=HEX
        ["--nonce", "xyz"],                     # not hex
        ["--nonce", "00" * 1025],               # too long
        ["--at", "yesterday"],                  # not ISO 8601
        ["--at", "2025-06-01T10:00:00"],        # no offset
        ["--user-data-file", "/nonexistent/ud"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, public_key_file: Path, bad: list[str]) -> None:
    out = tmp_path / "doc"
    code, output = run("local", "attest", "--pki-dir", tmp_path / "pki", "--public-key-file", public_key_file,
                       *bad, "-o", out)
    assert code == 2, output
    assert not out.exists()


def test_missing_required_options_exit_2(tmp_path: Path) -> None:
    assert run("local", "attest", "--pki-dir", tmp_path / "pki", "-o", tmp_path / "doc")[0] == 2
    assert run("local", "attest", "--pki-dir", tmp_path / "pki", "--public-key-file",
               tmp_path / "missing.der", "-o", tmp_path / "doc")[0] == 2


def test_oversized_public_key_exits_2(tmp_path: Path) -> None:
    big = tmp_path / "big.der"
    big.write_bytes(b"\x00" * 1025)
    assert run("local", "attest", "--pki-dir", tmp_path / "pki", "--public-key-file", big,
               "-o", tmp_path / "doc")[0] == 2
