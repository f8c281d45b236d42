"""Output protection on the served path: the enclave's gRPC server in process, through real gRPC.

The server, NSM and model are those of ``test_enclave_server`` (a real ``generic:mlp-classifier``); the
config's measured ``protection`` section decides what a caller sees. The same flows through the local
stack's real processes are in ``test_local_protection.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography import x509
from test_enclave_server import CONFIG, PCRS, TOKEN, ServerThread, mlp_handler, mlp_module, short_socket_dir

from enclave_app.boot import attach_text_watermark
from enclave_app.config import EnclaveConfig
from enclave_app.models import load_handler
from enclave_app.outputs import SealedExtras
from nitrovault.attestation import load_root
from nitrovault.client import NitrovaultClient
from nitrovault.errors import ClientError
from nitrovault.local.nsm import make_local_nsm
from nitrovault.nsm import Nsm
from nitrovault.receipts import verify_receipt
from nitrovault.watermark import GreenList, derive_watermark_keys, detect_text_mark


def with_protection(section: dict[str, Any]) -> EnclaveConfig:
    data = json.loads(CONFIG.to_json())
    data["protection"] = section
    return EnclaveConfig.from_mapping(data)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki") / "pki"


@pytest.fixture(scope="module")
def nsm(pki: Path) -> Nsm:
    return make_local_nsm(pki, PCRS)


class Served:
    def __init__(self, nsm: Nsm, section: dict[str, Any], root: x509.Certificate, *,
                 handler: str = CONFIG.handler) -> None:
        self.root = root
        self.lines: list[bytes] = []
        self.directory = short_socket_dir()
        self.config = replace(with_protection(section), handler=handler)
        self.server = ServerThread(self.config, nsm, str(self.directory / "g.sock"),
                                   audit_sink=self.lines.append)
        self.module = mlp_module()
        if handler == CONFIG.handler:
            self.server.serve(mlp_handler(self.module))

    def client(self, token: str = TOKEN) -> NitrovaultClient:
        # the subject is the output guard, not the transport: a plaintext server (TLS: test_client)
        return NitrovaultClient(self.server.target, token=token, timeout=10, unsafe_plaintext=True)

    def records(self) -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in self.lines]
        return [e["body"] for e in entries if e["kind"] == "record"]


@pytest.fixture
def serve(nsm: Nsm, pki: Path) -> Iterator[Any]:
    started: list[Served] = []
    root = load_root(pki / "root.pem")

    def start(section: dict[str, Any], **options: Any) -> Served:
        started.append(Served(nsm, section, root, **options))
        return started[-1]

    yield start
    for s in started:
        s.server.close()


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8), dtype=np.float32)


def test_a_hardened_answer_hides_the_logits_and_its_receipt_covers_what_was_returned(serve: Any) -> None:
    served = serve({"hardening": {"kind": "label_only"}})
    x = rows(4)
    with served.client() as client:
        outputs, receipted = client.infer_with_receipt({"x": x})
        document = client.attest()
    assert set(outputs) == {"probabilities"}
    with torch.inference_mode():
        clean = served.module(torch.from_numpy(x))["probabilities"].numpy()
    assert np.array_equal(outputs["probabilities"].argmax(1), clean.argmax(1))
    assert set(np.unique(outputs["probabilities"])) == {0.0, 1.0}
    receipt = verify_receipt(receipted.receipt, attestation_doc=document, root=served.root,
                             at=datetime.now(UTC), response=receipted.response)
    assert receipt.subject == "tester"


def test_extraction_block_is_permission_denied_and_audited_with_its_evidence(serve: Any) -> None:
    served = serve({"extraction": {"volume_max": 6, "actions": {"volume": "block"}}})
    with served.client() as client:
        client.infer({"x": rows(4)})
        with pytest.raises(ClientError) as tripped:
            client.infer({"x": rows(3, seed=1)})  # 7 rows: past the limit
        assert tripped.value.code == "PERMISSION_DENIED"
        with pytest.raises(ClientError) as again:
            client.infer({"x": rows(1, seed=2)})
        assert again.value.code == "PERMISSION_DENIED"
        assert "extraction" not in again.value.details  # the reason stays in the enclave
    records = served.records()
    refused = [r for r in records if r.get("reason") == "extraction-blocked"]
    assert len(refused) == 2
    evidence = refused[0]["protection"]["extraction"]
    assert evidence["signals"] == ["volume"] and evidence["action"] == "block"
    assert evidence["volume_in_window"] == 7
    assert "protection" not in refused[1]  # refused at admission: the model never ran
    text = b"".join(served.lines).decode()
    assert str(float(rows(3, seed=1)[0, 0]))[:8] not in text  # inputs never reach the audit log


def test_the_privacy_budget_runs_out_with_retry_after(serve: Any) -> None:
    served = serve({"privacy": {"mechanism": {"kind": "laplace", "epsilon": 1.0, "sensitivity": 2.0},
                                "budget": {"epsilon": 3.0}}})
    with served.client() as client:
        first = client.infer({"x": rows(2)})["probabilities"]
        assert np.allclose(first.sum(1), 1.0, atol=1e-5)
        with pytest.raises(ClientError) as refused:
            client.infer({"x": rows(2)})
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        client.infer({"x": rows(1)})  # the refused call spent nothing
    records = served.records()
    assert [r["decision"] for r in records] == ["ok", "quota", "ok"]
    assert records[1]["reason"] == "privacy-budget"
    assert records[0]["protection"]["privacy"]["remaining_epsilon"] == "1"
    assert records[2]["protection"]["privacy"]["remaining_epsilon"] == "0"


def test_no_policy_serves_every_output(serve: Any) -> None:
    served = serve({})
    with served.client() as client:
        outputs = client.infer({"x": rows(2)})
    assert set(outputs) == {"logits", "probabilities"}
    assert all("protection" not in r for r in served.records())


def test_a_protected_model_without_probabilities_fails_closed(serve: Any) -> None:
    served = serve({"hardening": {"kind": "top_k", "k": 1}})

    class LogitsOnly:
        kind = "test-logits"
        rows_independent = False

        def warm_up(self) -> None:
            pass

        def embed(self, texts: Any, *, normalize: bool) -> np.ndarray:
            raise AssertionError

        def infer(self, inputs: Any) -> dict[str, torch.Tensor]:
            return {"logits": torch.zeros(1, 3)}

    served.server.serve(LogitsOnly())  # type: ignore[arg-type]
    with served.client() as client, pytest.raises(ClientError) as refused:
        client.infer({"x": rows(1)})
    assert refused.value.code == "INTERNAL"
    assert "probabilities" not in refused.value.details


def test_generated_text_carries_the_green_list_mark_only_when_the_policy_asks(serve: Any) -> None:
    vocab = 200
    keys = derive_watermark_keys(bytes(range(32)), CONFIG.model_id)
    green = GreenList(keys, vocab_size=vocab, gamma=0.25)
    # a fairly flat bigram LM: next-token logits drawn once, small spread
    logits = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 0.5
    metadata = {"nitrovault.config": json.dumps({"vocab_size": vocab, "max_new_tokens": 300})}
    z = {}
    for asks in (True, False):
        section = {"watermark": {"text": {"gamma": 0.25, "delta": 2.0}}} if asks else {}
        served = serve(section, handler="causal-lm:bigram")
        handler = load_handler("causal-lm:bigram", {"logits": logits.clone()}, metadata)
        attach_text_watermark(served.config, handler, SealedExtras(watermark_keys=keys))
        served.server.serve(handler)
        with served.client() as client:
            tokens = client.infer({"input_ids": np.array([[1], [2], [3]], dtype=np.int64),
                                   "max_new_tokens": np.array([200], dtype=np.int64)})["tokens"]
        assert tokens.shape == (3, 200)
        z[asks] = [detect_text_mark([int(t) for t in row], green).z for row in tokens]
    assert min(z[True]) > 4.0, z  # every sample is called watermarked (one-sided p < 3.2e-5)
    assert max(z[False]) < 4.0, z
