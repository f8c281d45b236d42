"""The green-list text watermark inside the generation loop: torch's side of
:mod:`nitrovault.watermark.text` (which stays pure: numpy masks, no torch).

:class:`GreenListProcessor` adds ``delta`` to the green logits of each row before sampling, with the
``(input_ids, scores) -> scores`` signature of a Hugging Face ``LogitsProcessor``; the causal-LM handler
appends it at boot when the sealed metadata asks for the text mark (``enclave_app/boot.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import WatermarkKeys
from nitrovault.watermark.text import DEFAULT_DELTA, DEFAULT_GAMMA, GreenList

__all__ = ["GreenListProcessor"]


class GreenListProcessor:
    """Add ``delta`` to the green logits of each row (a Hugging Face-style logits processor).

    ``input_ids``: [batch, seq] token ids so far (the last column seeds the list); ``scores``: [batch, vocab].
    """

    def __init__(self, keys: WatermarkKeys, gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA, *,
                 vocab_size: int) -> None:
        if delta < 0:
            raise ConfigError("green-list delta must be >= 0")
        self.green = GreenList(keys, vocab_size=vocab_size, gamma=gamma)
        self.delta = delta

    def __repr__(self) -> str:
        return f"GreenListProcessor({self.green!r}, delta={self.delta})"

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] != self.green.vocab_size:
            raise ConfigError("logits do not have the green list's vocabulary size")
        previous = input_ids[:, -1].tolist()
        masks = np.stack([self.green.mask(int(p)) for p in previous])
        bias = torch.from_numpy(masks).to(device=scores.device, dtype=scores.dtype) * self.delta
        return scores + bias
