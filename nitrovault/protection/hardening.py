"""Output hardening: what a classifier or embedding model lets a caller see (pure numpy).

A :class:`HardeningPolicy` is parsed from a config mapping (the model's entry in the measured enclave
config, so the policy a client is served under is part of what PCR0/PCR2 attest) and applied to every
answer after the model ran and before the receipt is signed::

    policy = HardeningPolicy.from_config({"kind": "top_k", "k": 3})
    policy.apply(probabilities)          # [batch, classes] -> [batch, classes]

Classifier policies (input: a ``[batch, classes]`` array of probabilities, rows summing to 1):

======================  ==================================================================  ============
kind                    effect                                                              arg-max kept
======================  ==================================================================  ============
``full``                unchanged                                                           yes
``top_k`` (``k``)       only the k largest probabilities are kept, the rest set to 0; the   yes
                        kept mass is renormalised to sum to 1
``rounded``             probabilities rounded to ``decimals`` decimals (rows then sum to 1   yes
(``decimals``)          within ``classes * 10^-decimals``); where rounding made another class
                        tie the arg-max, the arg-max gets one more unit of the last decimal
``label_only``          one-hot of the arg-max (the thief gets labels, nothing else)        yes
``reverse_sigmoid``     Lee et al. 2019 ("Defending against NN model stealing attacks using  yes
(``beta``, ``gamma``)   deceptive perturbations"): ``q = p - beta * (sigmoid(gamma *
                        logit(p)) - 1/2)``, clipped to >= 0 and renormalised. The arg-max
                        class is forced back to the top if the perturbation displaced it
                        (the formula is ART's ``ReverseSigmoid`` postprocessor; ART does
                        not guarantee the arg-max, this does).
======================  ==================================================================  ============

Embedding policies (input: a ``[batch, dim]`` array; the output has the same shape, and rows that came
in L2-normalised, within 1e-3, leave L2-normalised):

* ``embedding_round`` (``decimals``): coordinates rounded to ``decimals`` decimals;
* ``embedding_noise`` (``sigma``): i.i.d. Gaussian noise of standard deviation ``sigma`` per
  coordinate. The generator is a parameter (``rng=`` to :meth:`apply`); without one a fresh
  OS-seeded generator is used. There is deliberately no seed in the config: a fixed seed would add
  the same noise vector to every answer, which an attacker cancels by taking differences.

Cost, measured by ``bench/bench_extraction.py`` (accuracy with and without each policy): every
classifier policy keeps the arg-max, so **top-1 accuracy is unchanged by construction**; what a
benign caller loses is calibrated confidence (top-k, rounding, label-only) or the exact probability
values (reverse sigmoid: the perturbed vector is still a distribution with the same top class, but
its other entries are deliberately misleading). For embeddings, rounding to d decimals moves each
coordinate by at most 0.5 * 10^-d, and noise of sigma per coordinate changes cosine similarities by
roughly sigma * sqrt(2) for unit vectors of any dimension; nearest-neighbour retrieval is unaffected
as long as that is small against the gap between the first and second neighbour.

What a policy does NOT do: a policy that keeps the arg-max cannot stop a label-only thief (ART's
``use_probability=False`` mode), it only takes away the extra signal of the probabilities.

Invariants: policies are pure (the noise generator is an argument), never change shapes, never
return NaN, and every classifier policy listed above returns rows that sum to 1 (``rounded``: within
its rounding error) with the arg-max of the input (ties in the input are resolved as
:func:`numpy.argmax` does: first index).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from nitrovault.errors import ConfigError

__all__ = ["CLASSIFIER_KINDS", "EMBEDDING_KINDS", "HardeningPolicy"]

FloatArray = npt.NDArray[np.float64]

CLASSIFIER_KINDS = frozenset({"full", "top_k", "rounded", "label_only", "reverse_sigmoid"})
EMBEDDING_KINDS = frozenset({"embedding_round", "embedding_noise"})

_PARAMS: Mapping[str, Mapping[str, type]] = {
    "full": {},
    "top_k": {"k": int},
    "rounded": {"decimals": int},
    "label_only": {},
    "reverse_sigmoid": {"beta": float, "gamma": float},
    "embedding_round": {"decimals": int},
    "embedding_noise": {"sigma": float},
}
_EPS = 1e-12


@dataclass(frozen=True)
class HardeningPolicy:
    """One output policy. Build it with :meth:`from_config` (or directly, with the same validation)."""

    #: one of :data:`CLASSIFIER_KINDS` or :data:`EMBEDDING_KINDS`
    kind: str = "full"
    #: ``top_k``: how many classes are shown, >= 1
    k: int | None = None
    #: ``rounded`` / ``embedding_round``: decimals kept, 0..8
    decimals: int | None = None
    #: ``reverse_sigmoid``: perturbation magnitude, > 0 (Lee et al. use 0.1 .. 1)
    beta: float | None = None
    #: ``reverse_sigmoid``: sigmoid steepness, > 0
    gamma: float | None = None
    #: ``embedding_noise``: standard deviation of the per-coordinate Gaussian noise, > 0
    sigma: float | None = None

    classifier_kinds: ClassVar[frozenset[str]] = CLASSIFIER_KINDS
    embedding_kinds: ClassVar[frozenset[str]] = EMBEDDING_KINDS

    def __post_init__(self) -> None:
        if self.kind not in _PARAMS:
            raise ConfigError(f"unknown hardening kind {self.kind!r}; one of {sorted(_PARAMS)}")
        wanted = _PARAMS[self.kind]
        for name in ("k", "decimals", "beta", "gamma", "sigma"):
            value = getattr(self, name)
            if name not in wanted and value is not None:
                raise ConfigError(f"hardening kind {self.kind!r} takes no {name!r}")
            if name in wanted and value is None:
                raise ConfigError(f"hardening kind {self.kind!r} needs {name!r}")
        if self.k is not None and self.k < 1:
            raise ConfigError("k must be at least 1")
        if self.decimals is not None and not 0 <= self.decimals <= 8:
            raise ConfigError("decimals must be within 0..8")
        for name in ("beta", "gamma", "sigma"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HardeningPolicy:
        """Parse ``{"kind": "top_k", "k": 3}``-style mappings; unknown kinds or keys are a ConfigError."""
        if not isinstance(config, Mapping):
            raise ConfigError("a hardening policy is a mapping with a 'kind'")
        kind = config.get("kind", "full")
        if not isinstance(kind, str) or kind not in _PARAMS:
            raise ConfigError(f"unknown hardening kind {kind!r}; one of {sorted(_PARAMS)}")
        params = _PARAMS[kind]
        unknown = set(config) - {"kind"} - set(params)
        if unknown:
            raise ConfigError(f"unknown key(s) for hardening kind {kind!r}: {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name, typ in params.items():
            if name not in config:
                continue
            raw = config[name]
            wrong_type = typ is int and not isinstance(raw, int)
            if isinstance(raw, bool) or not isinstance(raw, int | float) or wrong_type:
                raise ConfigError(f"{name!r} must be {'an integer' if typ is int else 'a number'}")
            values[name] = typ(raw)
        return cls(kind=kind, **values)

    def to_config(self) -> dict[str, Any]:
        """The mapping :meth:`from_config` reads (for the measured config and the audit log)."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in _PARAMS[self.kind]:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @property
    def for_embeddings(self) -> bool:
        return self.kind in EMBEDDING_KINDS

    def apply(self, outputs: npt.ArrayLike, *, rng: np.random.Generator | None = None) -> FloatArray:
        """Apply the policy to ``[batch, classes]`` probabilities or ``[batch, dim]`` embeddings."""
        x = np.asarray(outputs, dtype=np.float64)
        squeeze = x.ndim == 1
        if squeeze:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError("outputs must be [batch, classes] or [batch, dim]")
        if not np.all(np.isfinite(x)):
            raise ValueError("outputs must be finite")
        out = _APPLY[self.kind](self, x, rng)
        return out[0] if squeeze else out


# -- classifier policies ------------------------------------------------------------------------------------


def _renormalise(q: FloatArray) -> FloatArray:
    q = np.clip(q, 0.0, None)
    total = q.sum(axis=1, keepdims=True)
    return np.asarray(q / np.where(total > 0, total, 1.0), dtype=np.float64)


def _force_argmax(q: FloatArray, top: npt.NDArray[np.intp]) -> FloatArray:
    """Make ``top`` the (first) arg-max of every row: where another class reached it, swap the two."""
    rows = np.arange(q.shape[0])
    wrong = np.argmax(q, axis=1) != top
    if np.any(wrong):
        q = q.copy()
        other = np.argmax(q, axis=1)
        r = rows[wrong]
        hi, lo = q[r, other[wrong]].copy(), q[r, top[wrong]].copy()
        q[r, top[wrong]], q[r, other[wrong]] = hi, lo
        # exact ties now sit at a lower index than top only if ``other`` < ``top``: nudge top up
        still = np.argmax(q, axis=1) != top
        if np.any(still):
            q[rows[still], top[still]] += 1e-9
            q = _renormalise(q)
    return q


def _full(_: HardeningPolicy, p: FloatArray, __: np.random.Generator | None) -> FloatArray:
    return p.copy()


def _top_k(policy: HardeningPolicy, p: FloatArray, _: np.random.Generator | None) -> FloatArray:
    k = min(int(policy.k or 1), p.shape[1])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    q = np.zeros_like(p)
    np.put_along_axis(q, order, np.take_along_axis(p, order, axis=1), axis=1)
    return _force_argmax(_renormalise(q), np.argmax(p, axis=1))


def _rounded(policy: HardeningPolicy, p: FloatArray, _: np.random.Generator | None) -> FloatArray:
    unit = 10.0 ** -int(policy.decimals or 0)
    top = np.argmax(p, axis=1)
    rows = np.arange(p.shape[0])
    q = np.round(p, int(policy.decimals or 0))
    others = q.copy()
    others[rows, top] = -np.inf
    runner_up = others.max(axis=1) if p.shape[1] > 1 else np.zeros(p.shape[0])
    # rounding is monotonic, so the top class can only tie (never fall behind): break ties upwards
    tied = q[rows, top] <= runner_up
    q[rows[tied], top[tied]] = runner_up[tied] + unit
    return np.asarray(q, dtype=np.float64)


def _label_only(_: HardeningPolicy, p: FloatArray, __: np.random.Generator | None) -> FloatArray:
    q = np.zeros_like(p)
    q[np.arange(p.shape[0]), np.argmax(p, axis=1)] = 1.0
    return q


def _reverse_sigmoid(policy: HardeningPolicy, p: FloatArray, _: np.random.Generator | None) -> FloatArray:
    beta, gamma = float(policy.beta or 0.0), float(policy.gamma or 0.0)
    top = np.argmax(p, axis=1)
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    logit = np.log(clipped) - np.log1p(-clipped)
    perturbation = beta * (1.0 / (1.0 + np.exp(-gamma * logit)) - 0.5)
    q = _renormalise(p - perturbation)
    zero = q.sum(axis=1) <= _EPS  # everything clipped away: fall back to the label
    if np.any(zero):
        q[zero] = 0.0
        q[np.flatnonzero(zero), top[zero]] = 1.0
    return _force_argmax(q, top)


# -- embedding policies --------------------------------------------------------------------------------------


def _was_normalised(x: FloatArray) -> npt.NDArray[np.bool_]:
    return np.asarray(np.abs(np.linalg.norm(x, axis=1) - 1.0) < 1e-3)


def _renormalise_rows(x: FloatArray, mask: npt.NDArray[np.bool_]) -> FloatArray:
    if np.any(mask):
        norms = np.linalg.norm(x[mask], axis=1, keepdims=True)
        x[mask] = x[mask] / np.where(norms > 0, norms, 1.0)
    return x


def _embedding_round(policy: HardeningPolicy, x: FloatArray, _: np.random.Generator | None) -> FloatArray:
    return _renormalise_rows(np.round(x, int(policy.decimals or 0)), _was_normalised(x))


def _embedding_noise(policy: HardeningPolicy, x: FloatArray, rng: np.random.Generator | None) -> FloatArray:
    gen = rng if rng is not None else np.random.default_rng()
    noisy = x + gen.normal(0.0, float(policy.sigma or 0.0), size=x.shape)
    return _renormalise_rows(noisy, _was_normalised(x))


_APPLY = {
    "full": _full,
    "top_k": _top_k,
    "rounded": _rounded,
    "label_only": _label_only,
    "reverse_sigmoid": _reverse_sigmoid,
    "embedding_round": _embedding_round,
    "embedding_noise": _embedding_noise,
}
