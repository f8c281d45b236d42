"""Sentence embeddings from a BERT-family encoder with mean pooling (sentence-transformers style).

The encoder is built on the ``meta`` device and the unsealed tensors are *assigned* into it, so loading
costs no second copy of the weights. The tokenizer and the architecture's config travel inside the sealed
model's encrypted metadata, not in the image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError

CONFIG_KEY = "nitrovault.config"
TOKENIZER_KEY = "nitrovault.tokenizer"
MAX_SEQ_KEY = "nitrovault.max_seq_length"


@dataclass
class SentenceEmbeddingHandler:
    model: BertModel
    tokenizer: Tokenizer
    max_seq_length: int
    kind: str = "sentence-embedding"

    @classmethod
    def load(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
    ) -> SentenceEmbeddingHandler:
        try:
            config: dict[str, Any] = json.loads(metadata[CONFIG_KEY])
            tokenizer = Tokenizer.from_str(metadata[TOKENIZER_KEY])
            max_seq_length = int(metadata.get(MAX_SEQ_KEY, "256"))
        except (KeyError, ValueError, TypeError) as err:
            raise ModelLoadError(
                f"sealed model lacks a usable config or tokenizer ({type(err).__name__})"
            ) from None
        if config.get("model_type") != "bert":
            raise ModelLoadError("sentence-embedding handler serves BERT-family encoders only")
        with torch.device("meta"):
            model = BertModel(BertConfig(**config), add_pooling_layer=False)
        state = {k.removeprefix("bert."): v for k, v in tensors.items()}
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ModelLoadError(f"{len(missing)} tensors missing from the sealed model")
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
        # Non-persistent buffers (position ids) are not in the state dict: materialise them on the CPU.
        for name, buf in list(model.named_buffers()):
            if buf.is_meta:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                if attr == "position_ids":
                    fresh = torch.arange(buf.shape[-1]).expand(buf.shape)
                elif attr == "token_type_ids":
                    fresh = torch.zeros(buf.shape, dtype=torch.long)
                else:
                    raise ModelLoadError(f"buffer {name} cannot be initialised")
                module.register_buffer(attr, fresh, persistent=False)
        model.train(False)  # inference mode (``eval()`` is untyped in transformers)
        tokenizer.enable_truncation(max_length=max_seq_length)
        tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)))
        return cls(model=model, tokenizer=tokenizer, max_seq_length=max_seq_length)

    def warm_up(self) -> None:
        self.embed(["warm up"], normalize=True)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        if not texts:
            raise InvalidInputError("no texts given")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        types = torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        result: np.ndarray = pooled.float().numpy()
        return result

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise UnsupportedCallError("this model serves Embed, not Infer")
