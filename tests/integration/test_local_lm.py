"""The small LM through the local stack's real processes: what ``nitrovault local up --model lm`` serves.

One stack (``lm`` below, its own tmp home and port) seals the test-sized tiny GPT-2 (``tiny_lm``) with the
owner's watermark secret, binds the key to the measured image and streams ``Generate`` through the relay
into the enclave. The tests play the caller (streaming, scopes, bad input) and the owner (the mark in the
text, found from the text alone). ``nitrovault local up --model PATH`` runs once as a user would.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import wait_until

from nitrovault.errors import ClientError
from nitrovault.local.homes import Paths, free_port
from nitrovault.local.lm_demo import LM_ID, detect_in_text, lm_model
from nitrovault.local.stack import REPO_ROOT, LocalStack, TextProgress

pytestmark = pytest.mark.slow
#: |z| that text scored under a key it was not marked with stays below (z is N(0, 1) there; p ~ 0.003)
UNMARKED_Z = 3.0


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Iterator[tuple[LocalStack, str]]:
    """The running stack and what its steps printed (the demo call's line among them)."""
    home = tmp_path_factory.mktemp("lm") / "home"
    paths = Paths(home)
    paths.make()
    printed = io.StringIO()
    local = LocalStack(home, model=lm_model(paths, tiny_lm), listen=f"127.0.0.1:{free_port()}",
                       progress=TextProgress(printed))
    try:
        local.start()
        yield local, printed.getvalue()
    finally:
        local.close()


def _owner_secret(stack: LocalStack) -> bytes:
    return bytes.fromhex(stack.paths.owner_watermark_key.read_text().strip())


def test_the_demo_streams_through_the_relay_and_the_owner_finds_the_mark(lm: tuple[LocalStack, str]) -> None:
    _, printed = lm
    line = next(x for x in printed.splitlines() if "tokens streamed" in x)
    assert "receipt over the stream verified" in line
    found = re.search(r"owner's detector on the text: z = (-?[\d.]+) over (\d+) tokens", line)
    assert found is not None, line
    assert float(found.group(1)) > 2.0 and int(found.group(2)) > 20


def test_tokens_arrive_as_pieces_and_the_receipt_covers_them_all(lm: tuple[LocalStack, str]) -> None:
    stack, _ = lm
    with stack.client(stack.token(), timeout=60) as client:
        with client.generate_stream("The parent instance", max_new_tokens=24, temperature=0,
                                    stop=["\x00never"]) as stream:
            pieces = list(stream)
        result = stream.result
    assert result is not None and len(pieces) > 1
    assert "".join(pieces) == result.text
    assert (result.finish_reason, result.completion_tokens, result.model_id) == ("length", 24, f"{LM_ID}@1")
    assert result.receipted.receipt  # verified by the client against the attested receipt key
    assert all(piece.encode() in result.receipted.response for piece in pieces)  # the transcript holds them


def test_the_owner_tells_marked_text_from_text_under_another_key(lm: tuple[LocalStack, str],
                                                                   tiny_lm: Path) -> None:
    stack, _ = lm
    with stack.client(stack.token(), timeout=60) as client:
        text = client.generate("Security reviewers", max_new_tokens=112, temperature=1.0, seed=3).text
    owner = detect_in_text(text, tiny_lm, _owner_secret(stack), LM_ID)
    other = detect_in_text(text, tiny_lm, bytes(32), LM_ID)
    wrong_model = detect_in_text(text, tiny_lm, _owner_secret(stack), "another-model")
    assert owner.detected and owner.z > 4.0, owner
    assert not other.detected and not wrong_model.detected
    assert max(abs(other.z), abs(wrong_model.z)) < UNMARKED_Z


def test_generate_needs_its_own_scope(lm: tuple[LocalStack, str]) -> None:
    stack, _ = lm
    with (stack.client(stack.token("embedder", ("embed:*", "infer:*")), timeout=30) as client,
          pytest.raises(ClientError) as denied):
        client.generate("Hello", max_new_tokens=4)
    assert denied.value.code == "PERMISSION_DENIED"
    with stack.client(stack.token("writer", (f"generate:{LM_ID}",)), timeout=30) as client:
        assert client.generate("Hello", max_new_tokens=4, temperature=0).completion_tokens == 4


def test_bad_generate_requests_through_the_relay_get_clean_codes(lm: tuple[LocalStack, str]) -> None:
    stack, _ = lm
    with stack.client(stack.token(), timeout=30) as client:
        for bad in ({"prompt": ""}, {"prompt": "x", "max_new_tokens": 10**6}, {"prompt": "x", "top_p": 0.0},
                    {"prompt": "x", "temperature": -1.0}, {"prompt": "word " * 400}):
            with pytest.raises(ClientError) as refused:
                client.generate(**bad)
            assert refused.value.code == "INVALID_ARGUMENT", bad
        assert client.generate("still", max_new_tokens=2).completion_tokens == 2


def test_each_stream_is_one_audit_record_with_its_tokens(lm: tuple[LocalStack, str]) -> None:
    stack, _ = lm
    with stack.client(stack.token("auditee"), timeout=30) as client:
        client.generate("Audit", max_new_tokens=7, temperature=0)

    def records() -> list[dict[str, Any]]:
        folder = stack.current_audit_dir()
        lines = [] if folder is None else [
            json.loads(x) for f in sorted(folder.glob("audit-*.jsonl")) for x in f.read_text().splitlines()]
        return [x["body"] for x in lines if x["kind"] == "record" and x["body"]["subject"] == "auditee"]

    wait_until(lambda: len(records()) == 1, what="the auditee's Generate record")
    (record,) = records()
    assert (record["method"], record["items"], record["code"]) == ("Generate", 7, "OK")
    assert "Audit" not in json.dumps(record)  # the prompt is never logged


def test_local_up_serves_a_causal_lm_folder_given_by_path(tmp_path: Path, tiny_lm: Path) -> None:
    folder = shutil.copytree(tiny_lm, tmp_path / "My LM")
    done = subprocess.run(
        [sys.executable, "-m", "nitrovault", "local", "up", "--once", "--home", str(tmp_path / "home"),
         "--listen", f"127.0.0.1:{free_port()}", "--model", str(folder)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "my-lm: causal-lm:gpt2, protection: hardening full; text watermark" in done.stdout
    assert "tokens streamed" in done.stdout and "serving sealed my-lm" in done.stdout


def test_local_up_refuses_what_it_cannot_serve_before_starting_anything(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    for args, reason in ((["--model", str(tmp_path / "weights")], "pickle checkpoint only"),
                         (["--model", "lm", "--handler", "generic:x"], "--handler is for a model at a path")):
        done = subprocess.run([sys.executable, "-m", "nitrovault", "local", "up", "--once",
                               "--home", str(tmp_path / "home"), *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 1 and reason in done.stdout, done.stdout + done.stderr
        assert "model failed" in done.stdout
    assert not (tmp_path / "home" / "logs").exists()  # no process was started
