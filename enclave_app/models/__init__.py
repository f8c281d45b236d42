"""Model handlers registered in the enclave image.

A handler turns unsealed tensors (plus the sealed model's encrypted metadata: architecture config,
tokenizer) into something that serves. The architecture code lives in the image (measured); the weights
and the architecture's hyper-parameters arrive sealed, so neither is visible to the parent.

* ``sentence-embedding``: a BERT-family encoder with mean pooling (the demo all-MiniLM-L6-v2).
* ``generic:<architecture>``: a ``torch.nn.Module`` registered in :data:`ARCHITECTURES`, called with
  named tensors.
* ``causal-lm:<architecture>``: a causal LM registered in :data:`LM_ARCHITECTURES`; ``Infer`` samples
  a continuation of ``input_ids`` through the enclave's logits processors (the text watermark).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from enclave_app.models.base import ModelHandler, ModelLoadError
from enclave_app.models.causal_lm import LM_ARCHITECTURES, CausalLMHandler
from enclave_app.models.generic import ARCHITECTURES, GenericHandler
from enclave_app.models.sentence_embedding import SentenceEmbeddingHandler

__all__ = [
    "ARCHITECTURES",
    "LM_ARCHITECTURES",
    "CausalLMHandler",
    "ModelHandler",
    "ModelLoadError",
    "load_handler",
]

#: sealed-model metadata keys (safetensors ``__metadata__``, encrypted with the rest of the header)
HANDLER_KEY = "nitrovault.handler"


def load_handler(name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> ModelHandler:
    """The handler ``name`` (from the measured config) over ``tensors``; the sealed metadata must agree."""
    sealed_for = metadata.get(HANDLER_KEY)
    if sealed_for is not None and sealed_for != name:
        raise ModelLoadError(
            f"model was sealed for handler {sealed_for!r}, enclave is configured for {name!r}"
        )
    if name == "sentence-embedding":
        return SentenceEmbeddingHandler.load(tensors, metadata)
    if name.startswith("generic:"):
        return GenericHandler.load(name.removeprefix("generic:"), tensors, metadata)
    if name.startswith("causal-lm:"):
        return CausalLMHandler.load(name.removeprefix("causal-lm:"), tensors, metadata)
    raise ModelLoadError(f"no handler named {name!r} is registered in this image")
