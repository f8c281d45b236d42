"""Generated-text watermark in the manner of Kirchenbauer et al. ("A Watermark for Large Language Models",
ICML 2023): a soft green list seeded by the previous token, and a one-proportion z-test to detect it.

* **Green list.** For the previous token id ``p``, every vocabulary id ``v`` gets the pseudo-random value
  ``u_v``: the ``v``-th little-endian uint32 of the ChaCha20 keystream (RFC 8439) under
  ``HMAC-SHA256(text_key, "green|<vocab_size>|<p>")``. The ``round(gamma·|V|)`` ids with the smallest values
  are green (an exact-size list, as in the paper). HMAC + ChaCha20 instead of torch's generator: the list
  is the same on every device and library version, so text generated in the enclave is detected offline.
* **Generation**: add ``δ`` to the logits of the green ids before sampling. The torch side (a Hugging
  Face-style ``LogitsProcessor``) is the enclave's: :class:`enclave_app.models.green_list.GreenListProcessor`;
  this module stays pure (numpy, no torch).
* **Detection** (:func:`detect_text_mark`): ``T`` scored tokens (every token after the first), ``g`` of them
  green, ``z = (g - gamma·T) / sqrt(T·gamma·(1-gamma))``, one-sided ``p = 1 - Φ(z)``. H0 (text written
  without the key): each token is green with probability gamma. Repeated ``(previous, token)`` pairs
  are scored once by default (repetitive text would otherwise inflate ``z``: Kirchenbauer et al.,
  "On the Reliability of Watermarks for Large Language Models", 2023).

Invariants: the key never leaves :class:`GreenList` (not in ``repr``); masks are cached per previous token
(at most ``cache_size`` of them, bounded memory).

Example::

    >>> from nitrovault.watermark.keys import derive_watermark_keys
    >>> g = GreenList(derive_watermark_keys(bytes(32), "m"), vocab_size=1000, gamma=0.25)
    >>> int(g.mask(7).sum())
    250
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import WatermarkKeys, keystream

DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
#: z at or above which text is called watermarked (one-sided p ≈ 3e-5 ... FPR 1e-5 needs z ≥ 4.265)
DEFAULT_Z_THRESHOLD = 4.0


class GreenList:
    """The keyed green-list function: ``mask(previous_token) -> bool[vocab_size]``."""

    def __init__(self, keys: WatermarkKeys, *, vocab_size: int, gamma: float = DEFAULT_GAMMA,
                 cache_size: int = 65536) -> None:
        if vocab_size < 2 or not 0 < gamma < 1:
            raise ConfigError("green list needs vocab_size >= 2 and 0 < gamma < 1")
        self.vocab_size = vocab_size
        self.gamma = gamma
        self.green_count = max(1, min(vocab_size - 1, round(gamma * vocab_size)))
        self._key = keys.text
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __repr__(self) -> str:
        return f"GreenList(vocab_size={self.vocab_size}, gamma={self.gamma})"

    def mask(self, previous: int) -> np.ndarray:
        """Boolean mask of the green ids after ``previous`` (read-only, cached)."""
        cached = self._cache.get(previous)
        if cached is not None:
            self._cache.move_to_end(previous)
            return cached
        label = b"green|%d|%d" % (self.vocab_size, previous)
        values = np.frombuffer(keystream(self._key, label, 4 * self.vocab_size), dtype="<u4")
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[np.argpartition(values, self.green_count - 1)[: self.green_count]] = True
        mask.flags.writeable = False
        self._cache[previous] = mask
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return mask

    def is_green(self, previous: int, token: int) -> bool:
        return bool(self.mask(previous)[token])


@dataclass(frozen=True)
class TextDetection:
    z: float
    p_value: float
    scored: int
    green: int
    gamma: float
    threshold: float
    detected: bool

    def as_dict(self) -> dict[str, object]:
        return {"z": self.z, "p_value": self.p_value, "scored": self.scored, "green": self.green,
                "gamma": self.gamma, "threshold": self.threshold, "detected": self.detected}


def z_score(green: int, scored: int, gamma: float) -> float:
    if scored == 0:
        return 0.0
    return float((green - gamma * scored) / np.sqrt(scored * gamma * (1 - gamma)))


def detect_text_mark(
    tokens: Sequence[int],
    green: GreenList,
    *,
    threshold: float = DEFAULT_Z_THRESHOLD,
    ignore_repeated: bool = True,
) -> TextDetection:
    """The z-test of ``tokens`` (ids) against ``green``."""
    seen: set[tuple[int, int]] = set()
    scored = hits = 0
    for previous, token in itertools.pairwise(tokens):
        if not 0 <= token < green.vocab_size:
            raise ConfigError("token id outside the vocabulary")
        if ignore_repeated:
            if (previous, token) in seen:
                continue
            seen.add((previous, token))
        scored += 1
        hits += green.is_green(int(previous), int(token))
    z = z_score(hits, scored, green.gamma)
    return TextDetection(
        z=z, p_value=float(norm.sf(z)), scored=scored, green=hits, gamma=green.gamma, threshold=threshold,
        detected=scored > 0 and z >= threshold,
    )
