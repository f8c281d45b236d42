"""Sentence embeddings from a BERT-family encoder with mean pooling (sentence-transformers style).

The encoder is built on the ``meta`` device and the unsealed tensors are *assigned* into it, so loading
costs no second copy of the weights. The tokenizer and the architecture's config travel inside the sealed
model's encrypted metadata, not in the image.

A batch of texts is run in length buckets: the texts are ordered by token count and cut wherever the next
text is more than twice as long as the bucket's shortest (and longer by more than
:data:`BUCKET_SLACK` tokens), each bucket padded only to its own longest, so that short texts do not pay
for the attention over a long one's padding (sentence-transformers sorts by length for the same reason).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from transformers import BertConfig, BertModel

from enclave_app.models.base import InvalidInputError, ModelLoadError, UnsupportedCallError

CONFIG_KEY = "nitrovault.config"
TOKENIZER_KEY = "nitrovault.tokenizer"
MAX_SEQ_KEY = "nitrovault.max_seq_length"
#: tokens a bucket may grow past twice its shortest text before a new bucket starts
BUCKET_SLACK = 16


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices into ``lengths`` grouped into buckets of similar length (module docstring), shortest first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            first = lengths[buckets[-1][0]]
            if not (lengths[i] > 2 * first and lengths[i] > first + BUCKET_SLACK):
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return buckets


@dataclass
class SentenceEmbeddingHandler:
    model: BertModel
    tokenizer: Tokenizer
    max_seq_length: int
    pad_id: int = 0
    kind: str = "sentence-embedding"
    rows_independent: bool = True

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
        tokenizer.no_padding()  # each length bucket is padded on its own
        return cls(model=model, tokenizer=tokenizer, max_seq_length=max_seq_length,
                   pad_id=int(config.get("pad_token_id", 0)))

    def warm_up(self) -> None:
        self.embed(["warm up"], normalize=True)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        if not texts:
            raise InvalidInputError("no texts given")
        encodings = self.tokenizer.encode_batch(list(texts))
        parts = [(bucket, self._pool([encodings[i] for i in bucket]))
                 for bucket in length_buckets([len(e.ids) for e in encodings])]
        pooled = torch.empty(len(texts), parts[0][1].shape[1], dtype=parts[0][1].dtype)
        for bucket, part in parts:
            pooled[bucket] = part
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        result: np.ndarray = pooled.float().numpy()
        return result

    def _pool(self, encodings: Sequence[Encoding]) -> torch.Tensor:
        """Mean-pooled hidden states of one bucket, padded to its longest text."""
        width = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), width), dtype=torch.long)
        types = torch.zeros((len(encodings), width), dtype=torch.long)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, :n] = 1
            types[row, :n] = torch.tensor(e.type_ids, dtype=torch.long)
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return pooled

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise UnsupportedCallError("this model serves Embed, not Infer")
