"""``nitrovault generate`` and ``NitrovaultClient.generate`` over attested TLS: the text streams from a real
GPT-2 in the enclave's server, the receipt is checked against the attested key, and the saved receipt and
transcript verify offline with ``nitrovault receipt verify``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from handlers import lm_handler
from test_client import IDENTITY, PCRS, expect_for, runner, trust_args
from test_enclave_server import CONFIG, ISSUER, ServerThread, short_socket_dir
from test_server_generate import PROMPT, expected

from nitrovault.attestation import load_root
from nitrovault.cli import app
from nitrovault.client import NitrovaultClient
from nitrovault.local.nsm import make_local_nsm

AUTH = {"NITROVAULT_TOKEN": ISSUER.issue("cli-writer", ["generate:*"], 3600)}


@pytest.fixture(scope="module")
def pki_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generate-pki") / "pki"


@pytest.fixture(scope="module")
def server(pki_root: Path, tiny_lm: Path) -> Iterator[ServerThread]:
    directory = short_socket_dir()
    started = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"), tls=IDENTITY)
    started.serve(lm_handler(tiny_lm))
    try:
        yield started
    finally:
        started.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_cli_generate_streams_the_text_and_saves_a_receipt_that_verifies_offline(
        server: ServerThread, pki_root: Path, tiny_lm: Path, tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("receipt.cbor", "transcript.bin", "request.bin")}
    args = ["generate", PROMPT, "-n", "24", "-t", "0", "--target", server.target, *trust_args(pki_root),
            "--save-receipt", str(files["receipt.cbor"]), "--save-response", str(files["transcript.bin"]),
            "--save-request", str(files["request.bin"])]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 0, result.output
    text, reason, tokens = expected(lm_handler(tiny_lm), max_new_tokens=24, temperature=0.0)
    assert result.stdout == text + "\n"
    assert f"[{reason}: " in result.stderr and f"+ {tokens} generated tokens" in result.stderr
    assert "receipt verified" in result.stderr
    fetched = runner.invoke(app, ["attest", "fetch", "--target", server.target, *trust_args(pki_root),
                                  "-o", str(tmp_path / "doc.cbor")])
    assert fetched.exit_code == 0, fetched.output
    verify = ["receipt", "verify", str(files["receipt.cbor"]), "--attestation", str(tmp_path / "doc.cbor"),
              "--root", str(pki_root / "root.pem"), "--response", str(files["transcript.bin"]),
              "--request", str(files["request.bin"])]
    verified = runner.invoke(app, verify)
    assert verified.exit_code == 0, verified.output
    data = files["transcript.bin"].read_bytes()
    files["transcript.bin"].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    forged = runner.invoke(app, verify)
    assert forged.exit_code != 0 and "response" in forged.output


def test_cli_generate_without_the_scope_fails_with_one_error_line(server: ServerThread,
                                                                  pki_root: Path) -> None:
    env = {"NITROVAULT_TOKEN": ISSUER.issue("reader", ["embed:*"], 3600)}
    args = ["generate", PROMPT, "--target", server.target, *trust_args(pki_root)]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: PERMISSION_DENIED: permission denied"


def test_the_attested_client_checks_every_streams_receipt(server: ServerThread, pki_root: Path,
                                                          tiny_lm: Path) -> None:
    expect = expect_for(load_root(pki_root / "root.pem"))
    with NitrovaultClient(server.target, expect=expect, token=AUTH["NITROVAULT_TOKEN"], timeout=30) as client:
        result = client.generate(PROMPT, max_new_tokens=16, seed=4)
    assert result.text == expected(lm_handler(tiny_lm), max_new_tokens=16, seed=4)[0]
    assert result.receipted.receipt and result.model_id == "mlp@3"
