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

* **Per subject** (policy ``protection.watermark.text.per_subject``): the enclave keys the list by the
  calling subject's text key (``GreenList(..., subject=s)``,
  :func:`~nitrovault.watermark.keys.derive_subject_key`) **instead of** the model's: such text carries
  no model-level mark (``nitrovault watermark detect-text`` finds nothing in it), and
  :func:`trace_text_subjects` (``nitrovault watermark trace``) is its detector: it names the subject,
  or none.

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
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from scipy.stats import binom, norm

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import WatermarkKeys, derive_subject_key, keystream
from nitrovault.watermark.subjects import DEFAULT_TRACE_THRESHOLD, SubjectTrace, check_subjects, name_subject

DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
#: z at or above which text is called watermarked (one-sided p ≈ 3e-5 ... FPR 1e-5 needs z ≥ 4.265)
DEFAULT_Z_THRESHOLD = 4.0


class GreenList:
    """The keyed green-list function: ``mask(previous_token) -> bool[vocab_size]``."""

    def __init__(self, keys: WatermarkKeys, *, vocab_size: int, gamma: float = DEFAULT_GAMMA,
                 cache_size: int = 65536, subject: str | None = None) -> None:
        """``subject``: key the list by that subject's text key
        (:func:`~nitrovault.watermark.keys.derive_subject_key`) instead of the model's."""
        if vocab_size < 2 or not 0 < gamma < 1:
            raise ConfigError("green list needs vocab_size >= 2 and 0 < gamma < 1")
        self.vocab_size = vocab_size
        self.gamma = gamma
        self.green_count = max(1, min(vocab_size - 1, round(gamma * vocab_size)))
        self._key = keys.text if subject is None else derive_subject_key(keys, "text", subject)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GreenList(vocab_size={self.vocab_size}, gamma={self.gamma})"

    def mask(self, previous: int) -> np.ndarray:
        """Boolean mask of the green ids after ``previous`` (read-only, cached; thread-safe: the model
        workers share one list)."""
        with self._lock:
            cached = self._cache.get(previous)
            if cached is not None:
                self._cache.move_to_end(previous)
                return cached
        label = b"green|%d|%d" % (self.vocab_size, previous)
        values = np.frombuffer(keystream(self._key, label, 4 * self.vocab_size), dtype="<u4")
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[np.argpartition(values, self.green_count - 1)[: self.green_count]] = True
        mask.flags.writeable = False
        with self._lock:
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


def trace_text_subjects(
    tokens: Sequence[int],
    keys: WatermarkKeys,
    *,
    vocab_size: int,
    gamma: float = DEFAULT_GAMMA,
    subjects: Sequence[str],
    threshold: float = DEFAULT_TRACE_THRESHOLD,
) -> SubjectTrace:
    """Which listed subject's green list generated ``tokens`` (text served with ``per_subject``).

    For each subject ``s``: the green count ``g`` of the scored pairs ``T`` under ``s``'s list
    (:func:`detect_text_mark`, repeated pairs once) and the **exact** binomial tail
    ``p_s = P[Binom(T, green_count/|V|) >= g]`` (``scipy.stats.binom.logsf``), then Bonferroni over the
    list (:func:`~nitrovault.watermark.subjects.name_subject`).

    Why not ``1 - Phi(z)`` as :func:`detect_text_mark` reports: the binomial's right tail is heavier than
    the normal's, and at the ~1e-8 a 100-subject list needs, the normal approximation understates ``p``
    by 8 to 60 times for 25 to 400 tokens (gamma 0.25): a false naming rate above the threshold. The exact
    tail has none of that. H0 "the text was not generated with s's key": the tokens are then independent
    of s's lists (one independent list per previous token), so each distinct pair is green with
    probability ``green_count/|V|``, independently across previous tokens: the binomial is exact when no
    two scored pairs share a previous token. Pairs that do are drawn without replacement from one
    exact-size list (hypergeometric), which is less spread than the binomial (Hoeffding 1963: dominated
    in convex order); the calibrations find the test conservative.
    """
    listed = check_subjects(subjects)
    ids = [int(t) for t in tokens]
    if ids and not 0 <= ids[0] < vocab_size:  # detect_text_mark checks every later token
        raise ConfigError("token id outside the vocabulary")
    log10_p: dict[str, float] = {}
    scored = 0
    for subject in listed:
        green = GreenList(keys, vocab_size=vocab_size, gamma=gamma, subject=subject, cache_size=len(ids) + 1)
        result = detect_text_mark(ids, green)
        scored = result.scored
        log10_p[subject] = binom_log10_sf(result.green, result.scored, green.green_count / vocab_size)
    return name_subject(log10_p, threshold=threshold, rows=scored)


def binom_log10_sf(green: int, scored: int, rate: float) -> float:
    """``log10 P[Binom(scored, rate) >= green]`` (0 when nothing is scored). ``binom.logsf`` underflows to
    ``-inf`` in the far tail (900 of 1000 green at rate 0.25), so there the tail is summed in log space
    from the exact log-pmf terms instead."""
    if green <= 0 or scored == 0:
        return 0.0
    tail = float(binom.logsf(green - 1, scored, rate))
    if not math.isfinite(tail):
        tail = float(logsumexp(binom.logpmf(np.arange(green, scored + 1), scored, rate)))
    return tail / math.log(10)
