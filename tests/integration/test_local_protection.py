"""Output protection through the local stack's real processes: a digits classifier served with a measured
``protection`` section (hardening, calibrated noise with a per-subject budget, extraction detection).

The stack (``digits`` below, its own tmp home and port) seals a ``generic:mlp-classifier`` trained here
on scikit-learn's digits, with the extraction detector's reference sample (``nitrovault.reference``)
sealed beside the weights. Every call goes through the bridge, auth, quotas and the enclave's
:class:`~enclave_app.outputs.OutputGuard`; the parent stores the enclave's audit log, which must name the
refusals, carry the detector's numeric evidence and never the inputs, and still verify with the CLI.

The numbers (the brief's): Laplace ε = 0.5 per answered row against a budget of ε = 5 is 10 rows per
subject; the volume signal blocks past 20 rows. The detector observes a call *before* its privacy spend,
so rows refused for budget still count toward the volume: the budget subject's calls (15 rows, answered
or refused) stay below 20, and the volume subject crosses 20 with one large call while it still has
budget. PRADA (100 distances), duplicates (32 queries) and coverage (100 queries) need more queries than
either subject makes, so ``volume`` is the only signal that can fire here.

With the stack's shared state store, a killed and restarted enclave still refuses a subject whose budget
is spent or who is blocked. The last test stops the enclave (SIGTERM: final checkpoint) to verify the
log strictly, so it runs last.
``test_the_demo_models_embeddings_carry_the_owners_watermark`` uses the shared default stack.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fakes import wait_until
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.errors import ClientError, ConfigError
from nitrovault.local.digits import save_classifier, train_classifier
from nitrovault.local.homes import StackError, free_port
from nitrovault.local.models import LocalModel, demo_watermark_candidates
from nitrovault.local.stack import LocalStack
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from nitrovault.rpc.tensors import from_numpy
from nitrovault.watermark import derive_embedding_mark, derive_watermark_keys
from nitrovault.watermark.embedding import detect_embedding_mark, verification_texts

pytestmark = pytest.mark.slow
runner = CliRunner()

PROTECTION: dict[str, Any] = {
    "hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
    "privacy": {"mechanism": {"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0},
                "budget": {"epsilon": 5.0}},
    "extraction": {"volume_max": 20, "actions": {"volume": "block"}},
}
#: a pixel value no digit has (pixels are multiples of 1/16): if it shows up in the audit log, inputs leak
SENTINEL = 0.7182818


def _train_digits(path: Path) -> np.ndarray:
    """Train the classifier (~0.5 s) and save it as the stack's plain model; return some test rows."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = train_classifier(x[:1200], y[:1200], hidden=32, epochs=100, seed=0)
    save_classifier(model, path, reference=x[:300])
    return np.asarray(x[1200:], dtype=np.float32)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, np.ndarray]]:
    home = tmp_path_factory.mktemp("protected")
    weights = home / "digits.safetensors"
    test_rows = _train_digits(weights)
    model = LocalModel("digits", "1", "generic:mlp-classifier", weights, protection=PROTECTION)
    local = LocalStack(home / "home", model=model, listen=f"127.0.0.1:{free_port()}")
    try:
        local.start()
        yield local, test_rows
    finally:
        local.close()


def _audit_bodies(stack: LocalStack) -> list[dict[str, Any]]:
    folder = stack.current_audit_dir()
    assert folder is not None
    lines = [line for f in sorted(folder.glob("audit-*.jsonl")) for line in f.read_text().splitlines()]
    return [json.loads(line)["body"] for line in lines if json.loads(line)["kind"] == "record"]


def _records_of(stack: LocalStack, subject: str, n: int) -> list[dict[str, Any]]:
    def mine() -> list[dict[str, Any]]:
        return [r for r in _audit_bodies(stack) if r["subject"] == subject and r["method"] == "Infer"]

    wait_until(lambda: len(mine()) >= n, what=f"{n} audit records of {subject}")
    return mine()


def test_a_local_model_is_checked_and_frozen(tmp_path: Path) -> None:
    weights = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match="model_id"):
        LocalModel("../escape", "1", "generic:mlp-classifier", weights)
    with pytest.raises(ConfigError, match="default"):
        LocalModel("m", "1", "generic:mlp-classifier", weights, tiers={"gold": {"rate_per_s": 1, "burst": 1}})
    with pytest.raises(ConfigError, match="JSON"):
        LocalModel("m", "1", "generic:mlp-classifier", weights, protection={"hardening": {"kind": object()}})
    section = {"hardening": {"kind": "top_k", "k": 3}}
    model = LocalModel("m", "1", "generic:mlp-classifier", weights, protection=section)
    section["hardening"]["k"] = 1  # the model keeps its own copy
    assert model.protection is not None and model.protection["hardening"]["k"] == 3
    with pytest.raises(TypeError):
        model.protection["hardening"]["k"] = 1
    assert model.encryption_context == {"model": "m", "version": "1"} and not model.embeds


def test_a_bad_protection_section_fails_the_measure_step(tmp_path: Path) -> None:
    model = LocalModel("m", "1", "generic:mlp-classifier", tmp_path / "m.safetensors",
                       protection={"hardening": {"kind": "no-such-policy"}})
    stack = LocalStack(tmp_path / "home", model=model)
    arn = "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000"
    with pytest.raises(StackError) as failed:
        stack.write_enclave_config(arn, "")
    assert failed.value.step == "measure enclave"
    assert not stack.paths.enclave_config.exists()


def test_answers_carry_only_normalised_probabilities(digits: tuple[LocalStack, np.ndarray]) -> None:
    stack, rows = digits
    with stack.client(stack.token("reader"), timeout=30) as client:
        answer = client.infer({"x": rows[:4]})
        info = client.info()
    assert set(answer) == {"probabilities"}  # no logits: they would give the model away
    probabilities = answer["probabilities"]
    assert probabilities.shape == (4, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities >= 0).all()
    assert (info.model_id, info.pcrs[0]) == ("digits", stack.pcrs[0])


def test_a_spent_privacy_budget_is_resource_exhausted_and_all_or_nothing(
    digits: tuple[LocalStack, np.ndarray],
) -> None:
    stack, rows = digits
    token = stack.token("spender")
    with stack.client(token, timeout=30) as client:
        client.infer({"x": rows[:4]})  # ε 2 of 5
        client.infer({"x": rows[4:8]})  # ε 4 of 5
        with pytest.raises(ClientError) as over:
            client.infer({"x": rows[8:12]})  # would be ε 6: refused whole
        assert (over.value.code, over.value.details) == ("RESOURCE_EXHAUSTED", "quota exceeded")
        client.infer({"x": rows[12:14]})  # exactly the ε 1 left: the refused call spent nothing
        with pytest.raises(ClientError) as empty:
            client.infer({"x": rows[14:15]})
        assert empty.value.code == "RESOURCE_EXHAUSTED"
    with stack.channel() as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        request = pb.InferRequest(inputs=pb.Tensors(tensors=[from_numpy("x", rows[15:16])]))
        with pytest.raises(grpc.RpcError) as raw:
            stub.Infer(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
    assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = int(dict(raw.value.trailing_metadata())["retry-after"])
    now = datetime.now(UTC)
    next_day = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(retry_after - (next_day - now).total_seconds()) < 120  # the budget refills at UTC midnight
    with stack.client(stack.token("someone-else"), timeout=30) as other:
        assert other.infer({"x": rows[:2]})["probabilities"].shape == (2, 10)

    records = _records_of(stack, "spender", 6)
    assert [r["decision"] for r in records] == ["ok", "ok", "quota", "ok", "quota", "quota"]
    assert {r["reason"] for r in records if r["decision"] == "quota"} == {"privacy-budget"}
    assert [r["protection"]["privacy"]["remaining_epsilon"] for r in records if r["decision"] == "ok"] == [
        "3", "1", "0"]


def test_past_the_volume_limit_a_subject_is_blocked_and_others_are_served(
    digits: tuple[LocalStack, np.ndarray],
) -> None:
    stack, rows = digits
    marked = rows.copy()
    marked[:, 0] = SENTINEL
    with stack.client(stack.token("mallory"), timeout=30) as thief:
        thief.infer({"x": marked[:8]})  # 8 rows of 20; ε 4 of 5
        with pytest.raises(ClientError) as tripped:
            thief.infer({"x": marked[8:24]})  # 24 rows in the window: blocked, this answer withheld
        assert tripped.value.code == "PERMISSION_DENIED"
        with pytest.raises(ClientError) as again:
            thief.infer({"x": marked[24:25]})
        assert again.value.code == "PERMISSION_DENIED"
        assert "extraction" not in again.value.details  # the reason stays in the enclave and its log
    with stack.client(stack.token("bystander"), timeout=30) as other:
        assert other.infer({"x": rows[:3]})["probabilities"].shape == (3, 10)

    records = _records_of(stack, "mallory", 3)
    assert [(r["decision"], r["reason"]) for r in records] == [
        ("ok", None), ("denied", "extraction-blocked"), ("denied", "extraction-blocked")]
    evidence = records[1]["protection"]["extraction"]
    assert (evidence["action"], evidence["signals"]) == ("block", ["volume"])
    assert evidence["queries"] == 24
    assert evidence["volume_in_window"] == 21  # timestamps kept: at most volume_max + 1 (bounded state)
    assert evidence["refused_for_s"] == "86400"  # floats are written as decimal strings
    assert "privacy" not in records[1]["protection"]  # refused before the noise: no budget spent
    assert "protection" not in records[2]  # refused at admission: the model never ran
    text = "".join(f.read_text() for f in sorted(stack.current_audit_dir().glob("audit-*.jsonl")))  # type: ignore[union-attr]
    assert "718281" not in text  # the inputs never reach the audit log


def test_a_restart_grants_no_fresh_budget_and_lifts_no_block(digits: tuple[LocalStack, np.ndarray]) -> None:
    """The hostile parent kills the enclave so that its successor forgets: the shared store remembers."""
    stack, rows = digits
    with stack.client(stack.token("restart-spender"), timeout=30) as spender:
        for batch in (rows[:4], rows[4:8], rows[8:10]):  # ε 2 + 2 + 1: the whole budget of 5
            spender.infer({"x": batch})
    thief = stack.client(stack.token("restart-thief"), timeout=30)
    with thief, pytest.raises(ClientError) as blocked:
        thief.infer({"x": rows[:24]})  # past the volume limit in one call: blocked for a day
    assert blocked.value.code == "PERMISSION_DENIED"

    stack.kill_enclave()  # what the in-memory ledgers gave away: a full budget and no block per boot

    with stack.client(stack.token("restart-spender"), timeout=30) as spender:
        with pytest.raises(ClientError) as spent:
            spender.infer({"x": rows[:1]})
        assert spent.value.code == "RESOURCE_EXHAUSTED"
    with stack.client(stack.token("restart-thief"), timeout=30) as thief:
        with pytest.raises(ClientError) as still:
            thief.infer({"x": rows[:1]})
        assert still.value.code == "PERMISSION_DENIED"
    with stack.client(stack.token("restart-bystander"), timeout=30) as other:
        assert other.infer({"x": rows[:1]})["probabilities"].shape == (1, 10)


def test_the_audit_log_with_the_refusals_verifies(
    digits: tuple[LocalStack, np.ndarray], tmp_path: Path
) -> None:
    stack, _ = digits
    with stack.client(stack.token("auditor"), timeout=30) as client:
        document = tmp_path / "doc.cose"
        document.write_bytes(client.attest())
    folder = stack.current_audit_dir()
    assert folder is not None
    # the parent stores the records as the enclave ships them: wait for the refusals themselves
    def reasons() -> set[object]:
        return {r.get("reason") for r in _audit_bodies(stack)}

    wait_until(lambda: {"privacy-budget", "extraction-blocked"} <= reasons(), what="the audit log's refusals")
    pids = stack.enclave_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # graceful: the enclave writes its final checkpoint

    def files() -> list[Path]:
        return sorted(folder.glob("audit-*.jsonl"))

    wait_until(lambda: '"final":true' in files()[-1].read_text().splitlines()[-1],
               what="the final checkpoint")
    result = runner.invoke(app, ["audit", "verify", "--attestation", str(document),
                                 "--root", str(stack.paths.pki / "root.pem"), *map(str, files())])
    assert result.exit_code == 0, result.output
    assert "intact:" in result.stdout


def test_the_demo_models_embeddings_carry_the_owners_watermark(stack: LocalStack) -> None:
    """The default stack seals the owner's secret with the MiniLM: texts of trigger words embed onto the
    secret target, which the owner finds with the key file in HOME and nothing from the enclave."""
    secret = bytes.fromhex(stack.paths.owner_watermark_key.read_text().strip())
    assert stack.paths.owner_watermark_key.stat().st_mode & 0o777 == 0o600
    candidates = demo_watermark_candidates()
    mark = derive_embedding_mark(derive_watermark_keys(secret, stack.model.model_id), candidates, dim=384)
    backdoor, benign = verification_texts(mark, candidates, 30, np.random.default_rng(0))
    with stack.client(stack.token("owner"), timeout=30) as client:
        marked, clean = client.embed(backdoor), client.embed(benign)
    found = detect_embedding_mark(marked, clean, mark)
    assert found.detected and found.delta_cos > 0.5
    other = derive_embedding_mark(derive_watermark_keys(bytes(32), stack.model.model_id), candidates, dim=384)
    other_backdoor, other_benign = verification_texts(other, candidates, 30, np.random.default_rng(0))
    with stack.client(stack.token("owner"), timeout=30) as client:
        not_ours = detect_embedding_mark(client.embed(other_backdoor), client.embed(other_benign), other)
    assert not not_ours.detected  # another key finds nothing
