"""Running it for real, through the local stack's processes: two enclaves behind one parent, metrics
scraped from the parent, one enclave killed while the other serves, and a SIGTERM drain after which the
audit log verifies strictly and every receipt a client holds is in it.

The tests share one stack (two enclaves, the digits classifier) and run in file order: the last one
drains it.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import cbor2
import grpc
import numpy as np
import pytest
from fakes import wait_until
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from nitrovault.attestation import parse_document
from nitrovault.cli import app
from nitrovault.errors import ClientError
from nitrovault.local.digits import save_classifier, train_classifier
from nitrovault.local.homes import free_port
from nitrovault.local.models import LocalModel
from nitrovault.local.stack import LocalStack
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
runner = CliRunner()
SUBJECT = "fleet-subject-7f3a"  # must never appear in the metrics
WAIT = 120.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, np.ndarray]]:
    home = tmp_path_factory.mktemp("fleet")
    rng = np.random.default_rng(0)
    x = rng.random((400, 64), dtype=np.float32)
    y = (x[:, :8].sum(axis=1) > 4).astype(np.int64)
    weights = home / "digits.safetensors"
    save_classifier(train_classifier(x, y, hidden=16, epochs=5, seed=0), weights, reference=x[:50])
    model = LocalModel("fleet", "1", "generic:mlp-classifier", weights)
    local = LocalStack(home / "home", model=model, listen=f"127.0.0.1:{free_port()}", enclaves=2)
    try:
        local.start()
        yield local, x[:4]
    finally:
        local.close()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _calls(stack: LocalStack, enclave: str) -> float:
    return _value(_samples(stack.metrics()), "nitrovault_enclave_calls_total", method="Infer", code="OK",
                  enclave=enclave)


def _infer(stack: LocalStack, rows: np.ndarray, n: int) -> None:
    """``n`` calls, each on a new connection (the relay picks an enclave per connection)."""
    token = stack.token(SUBJECT, ("infer:*",))
    for _ in range(n):
        with stack.client(token, timeout=30) as client:
            assert client.infer({"x": rows})["logits"].shape == (len(rows), 2)


def test_two_enclaves_serve_and_the_parent_exports_their_metrics(
        fleet: tuple[LocalStack, np.ndarray]) -> None:
    stack, rows = fleet
    assert set(stack.enclave_status()) == {16, 17}
    token = stack.token(SUBJECT, ("infer:*",))
    # four clients connected at once: each new connection goes to the enclave holding fewer, so both
    # hold some (a client's short certificate probe can tip one choice, never three)
    clients = [stack.client(token, timeout=30) for _ in range(4)]
    try:
        for client in clients:
            assert client.infer({"x": rows})["logits"].shape == (len(rows), 2)
        for client in clients:
            client.infer({"x": rows})
    finally:
        for client in clients:
            client.close()
    # the enclaves report every few seconds; the totals reach the parent's endpoint unchanged
    wait_until(lambda: _calls(stack, "16") + _calls(stack, "17") >= 8, what="8 Infer calls counted",
               timeout=WAIT, interval=0.2)
    text = stack.metrics()
    samples = _samples(text)
    assert _calls(stack, "16") >= 2 and _calls(stack, "17") >= 2  # both took clients
    for cid in ("16", "17"):
        assert _value(samples, "nitrovault_parent_enclave_state", enclave=cid, state="SERVING") == 1.0
        assert _value(samples, "nitrovault_parent_enclave_boots_total", enclave=cid) == 1.0
        assert _value(samples, "nitrovault_enclave_call_seconds_count", enclave=cid, method="Infer") >= 1
        assert _value(samples, "nitrovault_enclave_batch_rows_count", enclave=cid) >= 1
        assert _value(samples, "nitrovault_enclave_audit_backlog", enclave=cid) >= 0
    assert _value(samples, "nitrovault_parent_relay_connections_total", relay="public") >= 8
    assert _value(samples, "nitrovault_parent_relay_bytes_total", relay="public", direction="up") > 0
    assert _value(samples, "nitrovault_parent_host_calls_total", method="ReportStatus", code="OK") >= 4
    assert _value(samples, "nitrovault_parent_draining") == 0.0
    # aggregates only: no subject, token or input ever reaches the parent's metrics
    assert SUBJECT not in text and "Bearer" not in text


def test_refusals_are_counted_by_reason(fleet: tuple[LocalStack, np.ndarray]) -> None:
    stack, rows = fleet
    before = _value(_samples(stack.metrics()), "nitrovault_enclave_refusals_total", reason="bad-signature")
    forged = stack.token(SUBJECT, ("infer:*",))[:-4] + "AAAA"
    with stack.client(forged, timeout=30) as client, pytest.raises(ClientError) as refused:
        client.infer({"x": rows})
    assert refused.value.code == "UNAUTHENTICATED"
    wait_until(lambda: _value(_samples(stack.metrics()), "nitrovault_enclave_refusals_total",
                              decision="denied", reason="bad-signature") > before,
               what="the forged token's refusal counted", timeout=WAIT, interval=0.2)


def test_one_enclave_is_killed_and_the_other_keeps_serving(fleet: tuple[LocalStack, np.ndarray]) -> None:
    stack, rows = fleet
    served_before = _calls(stack, "16")
    pids = stack.enclave_pids(17)
    assert len(pids) == 1 and pids[0] not in stack.enclave_pids(16)
    subprocess.run(["kill", "-KILL", str(pids[0])], check=True)  # what a hostile parent can do at will
    wait_until(lambda: stack.enclave_status()[17]["state"] != "SERVING", what="enclave 17 seen down",
               timeout=WAIT)
    _infer(stack, rows, 5)  # every call is answered: the relay sends new clients to 16 only
    assert stack.enclave_status()[16]["state"] == "SERVING"
    wait_until(lambda: _calls(stack, "16") >= served_before + 1, what="enclave 16 counted the calls",
               timeout=WAIT, interval=0.2)
    # the supervisor boots 17 again (a second attested Decrypt) and the relay sends it clients again
    wait_until(lambda: stack.enclave_status()[17]["state"] == "SERVING"
               and stack.enclave_status()[17]["boots"] == 2, what="enclave 17 serving again", timeout=WAIT)
    samples = _samples(stack.metrics())
    assert _value(samples, "nitrovault_parent_enclave_restarts_total", enclave="17") == 1.0
    assert _value(samples, "nitrovault_parent_enclave_restarts_total", enclave="16") == 0.0
    _infer(stack, rows, 4)


def _attestations(stack: LocalStack, folder: Path) -> list[Path]:
    """Both enclaves' attestation documents. Channels are held open while more are made: each new
    connection goes to the enclave holding fewer, so a few held channels reach both (sequential short
    connections would all go to the one holding fewer, which is the point of the choice)."""
    docs: dict[bytes, Path] = {}
    channels = []
    try:
        for i in range(8):
            channel = stack.channel()
            channels.append(channel)
            document = pb_grpc.InferenceStub(channel).Attest(pb.AttestRequest(), timeout=30).document
            path = folder / f"doc-{i}.cose"
            path.write_bytes(document)
            docs.setdefault(parse_document(document).user_data or b"", path)  # binds that boot's keys
            if len(docs) == 2:
                break
    finally:
        for channel in channels:
            channel.close()
    return list(docs.values())


def test_sigterm_drains_and_the_audit_log_verifies_strictly(
        fleet: tuple[LocalStack, np.ndarray], tmp_path: Path) -> None:
    stack, rows = fleet
    docs = _attestations(stack, tmp_path)
    assert len(docs) == 2
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    token = stack.token(SUBJECT, ("infer:*",))
    stop = threading.Event()
    answered: list[int] = []
    refused: list[str] = []

    def caller(n: int) -> None:
        """Calls until the drain closes the door: each one answered with a receipt or refused cleanly."""
        i = 0
        while not stop.is_set():
            try:
                with stack.client(token, timeout=30) as client:
                    _, receipted = client.infer_with_receipt({"x": rows})
                (receipts / f"{n}-{i}.cbor").write_bytes(receipted.receipt)
                answered.append(1)
            except (ClientError, grpc.RpcError, OSError) as err:
                refused.append(type(err).__name__)
                if len(refused) > 3:
                    return
            i += 1

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(2)]
    for thread in callers:
        thread.start()
    wait_until(lambda: len(answered) >= 4, what="calls in flight before the drain", timeout=WAIT)
    parent = next(p for p in stack.processes.children if "nitrovault.local.parent" in " ".join(p.args))
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=WAIT) == 0
    stop.set()
    for thread in callers:
        thread.join(WAIT)
    status = stack.enclave_status()
    assert {cid: e["state"] for cid, e in status.items()} == {16: "STOPPED", 17: "STOPPED"}
    assert not stack.enclave_pids()  # both enclaves ended on their own, after their final checkpoint
    # each serving boot's log ends with its final checkpoint: strict verification (no --live) passes,
    # and every receipt a client was given is in one of them
    folders = [d for d in stack.paths.audit.iterdir() if d.is_dir()]
    verified = []
    for doc in docs:
        for folder in folders:
            files = sorted(map(str, folder.glob("audit-*.jsonl")))
            result = runner.invoke(app, ["audit", "verify", "--attestation", str(doc), "--root",
                                         str(stack.paths.pki / "root.pem"), *files])
            if result.exit_code == 0:
                verified.append((doc, folder, files))
    assert len(verified) == 2 and len({f for _, f, _ in verified}) == 2, verified
    held = sorted(receipts.glob("*.cbor"))
    assert len(held) == len(answered) >= 4
    accounted = 0
    for doc, _, files in verified:
        for receipt in held:
            result = runner.invoke(app, ["audit", "verify", "--attestation", str(doc), "--root",
                                         str(stack.paths.pki / "root.pem"), *files,
                                         "--receipt", str(receipt)])
            accounted += result.exit_code == 0
    assert accounted == len(held)  # each receipt is in exactly one enclave's stored log
    assert all(len(cbor2.loads(r.read_bytes())) == 2 for r in held)
