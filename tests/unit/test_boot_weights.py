"""Boot step ``model-load`` with ``protection.weights``: :func:`enclave_app.boot.boot` wraps the handler as
the measured config asks, and a weights section that selects nothing in the sealed model fails the boot
with a reason that names the pattern (the measured config's own words) and nothing of the model."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_boot_state_store import CONTEXT, KEY, _boot, _config

from enclave_app.boot import BootFailure
from enclave_app.config import EnclaveConfig
from enclave_app.models.generic import MLPClassifier
from enclave_app.weights import DynamicHandler
from nitrovault.envelope import SealedModel, seal_file
from nitrovault.identity import TlsIdentity

MLP = {"in_features": 8, "hidden": [16], "classes": 3}


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    torch.manual_seed(3)
    state = {k: v.clone().contiguous() for k, v in MLPClassifier(**MLP).state_dict().items()}  # type: ignore[arg-type]
    metadata = TlsIdentity.generate(now=datetime.now(UTC)).sealed_metadata()
    metadata["nitrovault.config"] = json.dumps(MLP)
    save_file(state, str(tmp_path / "m.safetensors"), metadata=metadata)
    seal_file(tmp_path / "m.safetensors", tmp_path / "m.sealed", data_key=KEY, wrapped_key=b"w",
              key_id="arn:aws:kms:us-east-1:111122223333:key/k", encryption_context=CONTEXT)
    return tmp_path / "m.sealed"


def _with_weights(sealed: Path, weights: Any) -> EnclaveConfig:
    config = json.loads(_config(digest=SealedModel.open(sealed).header.digest.hex()).to_json())
    config["protection"]["weights"] = weights
    return EnclaveConfig.from_mapping(config)


def test_a_dynamic_boot_serves_through_the_weights_and_nothing_is_plaintext(
        sealed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _boot(monkeypatch, _with_weights(sealed, {"mode": "dynamic"}), sealed, None)
    handler = result.handler
    assert isinstance(handler, DynamicHandler)
    assert handler.weights.decrypted_blocks == 2  # the warm-up: one pass over the two linear layers
    out = handler.infer({"x": torch.zeros(2, 8)})
    assert next(iter(out.values())).shape == (2, 3)
    assert handler.weights.plaintext_blocks() == 0


def test_a_pattern_that_matches_nothing_fails_model_load_naming_only_the_pattern(
        sealed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _with_weights(sealed, {"mode": "dynamic", "tensors": ["net.*.weight", "decoder.*"]})
    with pytest.raises(BootFailure) as failed:
        _boot(monkeypatch, config, sealed, None)
    assert (failed.value.step, failed.value.reason) == (
        "model-load", "Protection.weights.tensors pattern 'decoder.*' matches no tensor of the sealed model")
