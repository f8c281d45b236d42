"""Weight watermark: key-derived secret projections of the weights carry the owner's bits (Uchida-style).

Scheme (Uchida et al., "Embedding Watermarks into Deep Neural Networks", ICMR 2017, embedded post hoc
instead of through a training regulariser):

1. **Coordinates.** The marked tensors are the floating 2-D tensors with at least ``MIN_ELEMENTS``
   entries (or the names given), in sorted name order. Each tensor is scaled by its own RMS, so
   ``z`` (the concatenated, flattened, scaled weights) has RMS 1 whatever the layer's scale. Above
   ``MAX_COORDS`` entries a key-derived subset of coordinates is used.
2. **Secret directions and bits.** ``K`` directions ``r_j`` in ``{-1, +1}^n`` and ``K`` message bits
   ``b_j`` come from a ChaCha20 keystream (RFC 8439) keyed by HMAC-SHA256 of the weights key: a
   specified generator, so a mark embedded today is detected by any later numpy/torch on any device.
   The projection ``s_j = <z, r_j> / sqrt(n)`` is ~N(0, 1) for any weights independent of the key.
3. **Embedding.** The minimum-norm change of ``z`` that makes every ``b_j·s_j >= strength`` (a margin
   in units of the null standard deviation): solve ``(R Rᵀ/n) c = d`` for the bits below the margin,
   add ``Rᵀ c / sqrt(n)`` (closed form, exact). Bits already beyond the margin are not touched. The
   relative weight change is about ``strength·sqrt(K/n)`` (≈ 10 % of each tensor's RMS at K=64,
   n=26k), spread as noise-like perturbation over every marked weight.
4. **Detection.** Recompute ``s_j`` on the suspect (scaled by the suspect's own RMS, so per-tensor
   rescaling does not matter), read ``sign(s_j)``, count matches ``m``. **Test:** exact one-sided
   binomial test, H0 "the suspect is independent of the key" ⇒ each sign matches with probability 1/2
   independently (``r_j`` are i.i.d. symmetric), ``p = P[Binom(K, 1/2) >= m]``. The bit error rate is
   ``1 - m/K``. Decide "marked" when ``p <= threshold`` (default ``1e-6``, i.e. ≥ 52/64 bits); the
   false-positive rate is then at most the threshold by construction, and measured on independently
   trained models in ``bench/bench_watermark.py``.
5. **Function-preserving permutations.** Permuting the hidden units of a feed-forward chain of
   ``Linear`` layers (rows of ``W_l`` and ``b_l``, columns of ``W_{l+1}``) leaves the model's function
   unchanged but scrambles the coordinates. With a reference (the owner's original), the suspect's
   units are re-aligned first: layer by layer, suspect rows are matched to reference rows by Pearson
   correlation with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``), and the
   permutation is undone. Chains are inferred from names (``<prefix>.weight``/``<prefix>.bias`` in
   natural order, consecutive when ``out(W_l) == in(W_{l+1})``), which is the ``mlp-classifier`` layout;
   other architectures (attention heads) are detected without re-alignment.

Invariants: the core takes and returns ``numpy`` arrays (no file or torch I/O here); tensors that are
not marked are returned unchanged (same objects); the key never appears in a report.

Example::

    >>> import numpy as np
    >>> from nitrovault.watermark.keys import derive_watermark_keys
    >>> keys = derive_watermark_keys(bytes(32), "m")
    >>> w = {"fc.weight": np.random.default_rng(0).normal(size=(64, 64)).astype("float32")}
    >>> marked, _ = embed_weight_mark(w, keys)
    >>> detect_weight_mark(marked, keys).detected, detect_weight_mark(w, keys).detected
    (True, False)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import binom

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import WatermarkKeys, keystream

DEFAULT_BITS = 64
#: margin of every bit after embedding, in standard deviations of the projection under H0
DEFAULT_STRENGTH = 2.0
#: p-value at or below which a suspect is called marked (≥ 52 of 64 bits)
DEFAULT_P_THRESHOLD = 1e-6
MIN_ELEMENTS = 256
MAX_COORDS = 1 << 18

_F32 = np.float32


@dataclass(frozen=True)
class EmbedReport:
    layers: tuple[str, ...]
    coordinates: int
    bits: int
    strength: float
    #: bits that had to be moved (were on the wrong side of, or inside, the margin)
    moved_bits: int
    #: ||Δz|| / ||z||: the weight change relative to the marked tensors' norm
    relative_change: float


@dataclass(frozen=True)
class WeightDetection:
    p_value: float
    bit_error_rate: float
    bits: int
    matching_bits: int
    threshold: float
    detected: bool
    #: mean of b_j·s_j (the margin, in null standard deviations; ≈ 0 for an unmarked model)
    mean_margin: float
    #: hidden layers whose units were re-aligned to the reference (empty without a reference)
    realigned: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "p_value": self.p_value, "bit_error_rate": self.bit_error_rate, "bits": self.bits,
            "matching_bits": self.matching_bits, "threshold": self.threshold, "detected": self.detected,
            "mean_margin": self.mean_margin, "realigned": list(self.realigned),
        }


def select_tensors(
    tensors: Mapping[str, np.ndarray],
    layers: Sequence[str] | None = None,
    *,
    min_elements: int = MIN_ELEMENTS,
) -> tuple[str, ...]:
    """The names marked: ``layers`` if given (each must exist and be floating), else the default rule."""
    if layers:
        for name in layers:
            if name not in tensors or not np.issubdtype(tensors[name].dtype, np.floating):
                raise ConfigError(f"no floating tensor named {name!r} to watermark")
        return tuple(sorted(set(layers)))
    chosen = tuple(
        sorted(
            name for name, t in tensors.items()
            if t.ndim == 2 and t.size >= min_elements and np.issubdtype(t.dtype, np.floating)
        )
    )
    if not chosen:
        raise ConfigError("no 2-D floating tensor large enough to carry a weight watermark")
    return chosen


@dataclass(frozen=True)
class _Plan:
    names: tuple[str, ...]
    #: per tensor: flat indices used
    indices: tuple[np.ndarray, ...]
    bits: np.ndarray  # ±1, shape [K]
    directions: np.ndarray  # ±1 int8, shape [K, n]


def _plan(tensors: Mapping[str, np.ndarray], keys: WatermarkKeys, names: tuple[str, ...], bits: int) -> _Plan:
    if not 8 <= bits <= 256:
        raise ConfigError("watermark bits must be between 8 and 256")
    # the layout (names and shapes) is bound into every label: a different layout is a different mark
    layout = ";".join(f"{n}:{'x'.join(map(str, tensors[n].shape))}" for n in names).encode()
    total = sum(int(tensors[n].size) for n in names)
    indices: list[np.ndarray] = []
    if total <= MAX_COORDS:
        indices = [np.arange(tensors[n].size) for n in names]
    else:  # a key-derived Bernoulli subset of about MAX_COORDS coordinates
        u = np.frombuffer(keystream(keys.weights, b"subset|" + layout, 4 * total), dtype="<u4")
        keep = u < np.uint32(int(MAX_COORDS / total * 2**32))
        offset = 0
        for n in names:
            size = int(tensors[n].size)
            indices.append(np.flatnonzero(keep[offset:offset + size]))
            offset += size
    n_coords = sum(len(i) for i in indices)
    if n_coords < 4 * bits:
        raise ConfigError(f"too few weights ({n_coords}) to carry {bits} watermark bits")
    msg_bytes = keystream(keys.weights, b"message|" + layout, (bits + 7) // 8)
    msg = np.unpackbits(np.frombuffer(msg_bytes, np.uint8))
    row_bytes = (n_coords + 7) // 8
    raw = np.frombuffer(keystream(keys.weights, b"directions|" + layout, bits * row_bytes), np.uint8)
    signs = np.unpackbits(raw.reshape(bits, row_bytes), axis=1)[:, :n_coords].astype(np.int8)
    return _Plan(
        names=names, indices=tuple(indices), bits=msg[:bits].astype(np.int8) * 2 - 1,
        directions=signs * 2 - 1,
    )


def _rms(t: np.ndarray) -> float:
    value = float(np.sqrt(np.mean(np.square(t, dtype=np.float64))))
    return value if value > 0 else 1.0


def _scaled(tensors: Mapping[str, np.ndarray], plan: _Plan) -> tuple[np.ndarray, list[float]]:
    scales = [_rms(tensors[n]) for n in plan.names]
    z = np.concatenate(
        [np.asarray(tensors[n], dtype=_F32).reshape(-1)[i] / s for n, i, s in zip(plan.names, plan.indices,
                                                                                   scales, strict=True)]
    )
    return z, scales


def _projections(z: np.ndarray, plan: _Plan) -> np.ndarray:
    raw = np.asarray(plan.directions.astype(_F32) @ z.astype(_F32), dtype=np.float64)
    return np.asarray(raw / np.sqrt(len(z)))


def embed_weight_mark(
    tensors: Mapping[str, np.ndarray],
    keys: WatermarkKeys,
    *,
    bits: int = DEFAULT_BITS,
    strength: float = DEFAULT_STRENGTH,
    layers: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], EmbedReport]:
    """Return marked copies of the selected tensors (others unchanged) and what was done."""
    if not 0 < strength <= 10:
        raise ConfigError("watermark strength must be in (0, 10]")
    names = select_tensors(tensors, layers)
    plan = _plan(tensors, keys, names, bits)
    z, scales = _scaled(tensors, plan)
    s = _projections(z, plan)
    b = plan.bits.astype(np.float64)
    target = b * np.maximum(b * s, strength)
    d = target - s
    active = np.flatnonzero(np.abs(d) > 0)
    delta = np.zeros_like(z, dtype=np.float64)
    if len(active):
        r = plan.directions[active].astype(np.float64) / np.sqrt(len(z))
        c = np.linalg.solve(r @ r.T, d[active])
        delta = r.T @ c
    out = dict(tensors)
    offset = 0
    for name, idx, scale in zip(plan.names, plan.indices, scales, strict=True):
        original = tensors[name]
        flat = np.array(original, dtype=np.float64).reshape(-1)
        flat[idx] += scale * delta[offset:offset + len(idx)]
        offset += len(idx)
        out[name] = flat.reshape(original.shape).astype(original.dtype)
    report = EmbedReport(
        layers=names, coordinates=len(z), bits=bits, strength=strength, moved_bits=len(active),
        relative_change=float(np.linalg.norm(delta)) / max(float(np.linalg.norm(z)), 1e-12),
    )
    return out, report


def binomial_p_value(matching: int, bits: int) -> float:
    """One-sided exact binomial test: ``P[Binom(bits, 1/2) >= matching]``."""
    return float(binom.sf(matching - 1, bits, 0.5))


def detect_weight_mark(
    tensors: Mapping[str, np.ndarray],
    keys: WatermarkKeys,
    *,
    reference: Mapping[str, np.ndarray] | None = None,
    bits: int = DEFAULT_BITS,
    layers: Sequence[str] | None = None,
    threshold: float = DEFAULT_P_THRESHOLD,
) -> WeightDetection:
    """Test ``tensors`` for the mark of ``keys``; with ``reference``, re-align hidden units first."""
    realigned: tuple[str, ...] = ()
    if reference is not None:
        tensors, realigned = align_to_reference(tensors, reference)
    names = select_tensors(reference if reference is not None else tensors, layers)
    for name in names:
        if name not in tensors:
            raise ConfigError(f"suspect model lacks tensor {name!r}")
        if reference is not None and tensors[name].shape != reference[name].shape:
            raise ConfigError(f"suspect tensor {name!r} does not have the reference's shape")
    plan = _plan(reference if reference is not None else tensors, keys, names, bits)
    z, _ = _scaled(tensors, plan)
    s = _projections(z, plan)
    agree = plan.bits * np.sign(s)
    matching = int(np.sum(agree > 0))  # a zero projection (e.g. fully pruned) counts as an error
    p = binomial_p_value(matching, bits)
    return WeightDetection(
        p_value=p, bit_error_rate=1 - matching / bits, bits=bits, matching_bits=matching,
        threshold=threshold, detected=p <= threshold,
        mean_margin=float(np.mean(plan.bits * s)), realigned=realigned,
    )


# -- re-alignment of hidden units -----------------------------------------------------------------------


def _natural(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def linear_chain(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, str | None]]:
    """``(weight, bias)`` names of the 2-D ``*.weight`` tensors in natural name order."""
    weights = sorted(
        (n for n, t in tensors.items() if n.endswith("weight") and t.ndim == 2), key=_natural
    )
    chain: list[tuple[str, str | None]] = []
    for w in weights:
        bias = w[: -len("weight")] + "bias"
        chain.append((w, bias if bias in tensors and tensors[bias].shape == (tensors[w].shape[0],) else None))
    return chain


def _standardise(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.where(norm > 0, norm, 1.0))


def align_to_reference(
    suspect: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Undo a hidden-unit permutation of ``suspect`` relative to ``reference`` (see step 5 above).

    Returns the re-aligned tensors (a new mapping) and the names of the layers whose units moved.
    """
    out = {k: np.asarray(v) for k, v in suspect.items()}
    chain = linear_chain(reference)
    moved: list[str] = []
    for (w, b), (w_next, _) in itertools.pairwise(chain):
        if w not in out or w_next not in out:
            continue
        ref_w, sus_w = np.asarray(reference[w], np.float64), np.asarray(out[w], np.float64)
        if ref_w.shape != sus_w.shape or out[w_next].shape[1] != ref_w.shape[0]:
            continue
        ref_f, sus_f = ref_w, sus_w
        if b is not None and b in out:
            ref_f = np.hstack([ref_w, np.asarray(reference[b], np.float64)[:, None]])
            sus_f = np.hstack([sus_w, np.asarray(out[b], np.float64)[:, None]])
        similarity = _standardise(ref_f) @ _standardise(sus_f).T
        _, perm = linear_sum_assignment(-similarity)
        if np.array_equal(perm, np.arange(len(perm))):
            continue
        moved.append(w)
        out[w] = out[w][perm]
        if b is not None and b in out:
            out[b] = out[b][perm]
        out[w_next] = out[w_next][:, perm]
    return out, tuple(moved)
