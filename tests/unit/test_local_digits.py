"""The digits demo model of ``nitrovault local up --model digits`` (``nitrovault.local.digits``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from enclave_app.config import EnclaveConfig
from enclave_app.models import load_handler
from enclave_app.outputs import SealedExtras
from nitrovault.envelope.extras import REFERENCE_TENSOR
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.digits import (
    DIGITS_HANDLER,
    DIGITS_PROTECTION,
    REFERENCE_ROWS,
    digits_data,
    write_digits_weights,
)


def test_the_written_model_loads_in_the_enclave_handler_and_classifies(tmp_path: Path) -> None:
    path = write_digits_weights(tmp_path / "plain" / "digits.safetensors")
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a mapping
    assert metadata["nitrovault.handler"] == DIGITS_HANDLER
    extras = SealedExtras.take(tensors, metadata, "digits")
    assert extras.reference is not None and extras.reference.shape == (REFERENCE_ROWS, 64)
    handler = load_handler(DIGITS_HANDLER, tensors, metadata)
    _, _, x_test, y_test = digits_data()
    probabilities = handler.infer({"x": torch.from_numpy(x_test)})["probabilities"].numpy()
    assert float(np.mean(probabilities.argmax(1) == y_test)) > 0.9
    mtime = path.stat().st_mtime_ns
    assert write_digits_weights(path) == path and path.stat().st_mtime_ns == mtime  # written once
    assert REFERENCE_TENSOR not in tensors


def test_the_demo_protection_is_a_valid_measured_section() -> None:
    config = EnclaveConfig.from_mapping({
        "model_id": "digits", "model_version": "1", "handler": DIGITS_HANDLER,
        "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k", "region": "us-east-1",
        "encryption_context": {"model": "digits", "version": "1"},
        "sealed_digest": "ab" * 32, "kms_ca_bundle": amazon_trust_services_pem(),
        "protection": json.loads(json.dumps(dict(DIGITS_PROTECTION))),
    })
    p = config.protection
    assert p.hardening_policy.kind == "reverse_sigmoid" and p.extraction_policy is not None
    assert p.budget_policy is not None and p.privacy_mechanism is not None
    assert p.budget_policy.epsilon / p.privacy_mechanism.epsilon == 1000  # rows per subject per day
