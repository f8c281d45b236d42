"""Calibrated noise on answers and a per-subject privacy budget that is spent and enforced.

Mechanisms (:class:`PrivacyMechanism`), added to every coordinate of an answer vector:

* **Laplace** (pure ε-DP): noise ``Lap(b)`` with ``b = Δ₁ / ε``, where ``Δ₁`` (``sensitivity``) bounds
  the L1 distance between any two answer vectors. For probability vectors ``Δ₁ = 2`` is the honest
  worst case (two distributions differ by at most 2 in L1).
* **Gaussian** ((ε, δ)-DP, the classic calibration of Dwork & Roth 2014, Thm. A.1):
  ``sigma = Δ₂ · sqrt(2 · ln(1.25 / δ)) / ε`` with ``Δ₂`` the L2 sensitivity (``sqrt(2)`` for probability
  vectors). The theorem holds for ``0 < ε < 1``; larger ε is refused (:class:`ConfigError`) rather than
  silently mis-calibrated. (diffprivlib's ``Gaussian`` has the same formula and the same limit.)

After the noise, probabilities are clipped to ``[0, 1]`` and renormalised, embeddings re-normalised if
they came in unit-length: post-processing, which costs no privacy. **The noise may change the arg-max**:
that is the price of a real DP guarantee; a policy that keeps the arg-max (see
:mod:`nitrovault.protection.hardening`) is a perturbation without a DP guarantee.

What the guarantee means here, honestly: each answer is ε- (or (ε, δ)-) indistinguishable between any
two model outputs within the stated sensitivity, so the probabilities (or embedding coordinates) an
attacker collects carry bounded information per answer, and the budget bounds it per subject and
period. It does **not** stop a label-only thief: the arg-max of a noisy vector is still the victim's
label most of the time (that is the point of serving it), and a thief trained on labels needs nothing
else. Nor does it stop a thief who spreads queries over many subjects (one budget per subject).

Budgets (:class:`PrivacyBudget`): each subject has ``epsilon`` (and ``delta``) per period, aligned to
the epoch of the injected clock (``period_s = 86400``: UTC days). An answer of ``n`` rows spends
``n · (ε, δ)`` under **basic sequential composition** (ε adds up; δ composes as ``1 - Π(1 - δᵢ)``).
Invariants:

* a spend is all-or-nothing: a refused spend consumes nothing;
* refused with :class:`~nitrovault.errors.QuotaExceededError` (``reason="privacy-budget"``,
  ``retry_after_s`` = time to the next period, when the budget is full again);
* at most ``max_subjects`` subjects are tracked; the least recently charged is evicted (LRU) and starts
  over with a full budget, and an enclave restart resets every budget: deployments name a shared
  state store, where :class:`nitrovault.state.SharedPrivacyBudget` keeps the same accounts (this class
  is its reference) so that neither a restart nor a second enclave grants a fresh budget;
* thread-safe (one lock); a clock that steps back never refills a budget.

Why this is written here rather than taken from a library: diffprivlib's ``BudgetAccountant`` keeps
a list of every spend (memory grows with each answer, ``total()`` is O(n)), which breaks the
bounded-state invariant of the enclave, and it would pull scikit-learn into the measured image; and
diffprivlib 0.6.6 (the current release) does not even import with scikit-learn 1.9 (its forest module
imports ``sklearn.tree._tree.DOUBLE``). opacus's RDP accountant is for subsampled Gaussian training
steps, not per-answer release. With slack 0 diffprivlib's accountant is exactly the two running
quantities kept here (Σ ε and 1 - Π(1 - δ)), and its ``Laplace``/``Gaussian`` use the same scales;
``tests/unit/test_privacy.py`` pins both formulas. The mechanisms are numpy because diffprivlib's
``randomise`` is scalar (one Python call per coordinate) and takes no per-call generator.

Example::

    mech = PrivacyMechanism.from_config({"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0})
    budget = PrivacyBudget(BudgetPolicy(epsilon=100.0), clock=clock)
    budget.spend("alice", *mech.cost(rows=len(batch)))
    noisy = mech.apply(batch, rng=np.random.default_rng())
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError, QuotaExceededError
from nitrovault.subjects import SubjectTable

__all__ = ["BudgetPolicy", "BudgetState", "PrivacyBudget", "PrivacyMechanism"]

FloatArray = npt.NDArray[np.float64]
TOLERANCE = 1e-9  # float sums of many small spends must not refuse the exact last one



def _number(config: Mapping[str, Any], name: str, default: float | None = None) -> float:
    raw = config.get(name, default)
    if raw is None:
        raise ConfigError(f"privacy mechanism needs {name!r}")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ConfigError(f"{name!r} must be a number")
    return float(raw)


@dataclass(frozen=True)
class PrivacyMechanism:
    """Laplace or Gaussian noise with a stated sensitivity and privacy cost per answer (one row)."""

    #: ``laplace`` or ``gaussian``
    kind: str
    #: ε per answer, > 0 (``gaussian``: < 1)
    epsilon: float
    #: L1 (Laplace) or L2 (Gaussian) sensitivity of one answer vector, > 0
    sensitivity: float
    #: δ per answer: 0 for Laplace, in (0, 1) for Gaussian
    delta: float = 0.0
    #: what the answers are: ``probabilities`` (clipped, renormalised) or ``embedding``
    output: str = "probabilities"

    def __post_init__(self) -> None:
        if self.kind not in ("laplace", "gaussian"):
            raise ConfigError(f"unknown privacy mechanism {self.kind!r}; one of ['gaussian', 'laplace']")
        if self.output not in ("probabilities", "embedding"):
            raise ConfigError("output must be 'probabilities' or 'embedding'")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError("epsilon must be a positive number")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ConfigError("sensitivity must be a positive number")
        if self.kind == "laplace" and self.delta != 0:
            raise ConfigError("the Laplace mechanism is pure epsilon-DP: delta must be 0")
        if self.kind == "gaussian":
            if not 0 < self.delta < 1:
                raise ConfigError("the Gaussian mechanism needs 0 < delta < 1")
            if self.epsilon >= 1:
                raise ConfigError("the classic Gaussian calibration holds for epsilon < 1 only")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrivacyMechanism:
        """``{"kind": "gaussian", "epsilon": 0.5, "delta": 1e-6, "sensitivity": 1.4142}``; unknown keys
        are a ConfigError."""
        if not isinstance(config, Mapping):
            raise ConfigError("a privacy mechanism is a mapping with a 'kind'")
        unknown = set(config) - {"kind", "epsilon", "delta", "sensitivity", "output"}
        if unknown:
            raise ConfigError(f"unknown privacy mechanism key(s): {sorted(unknown)}")
        kind = config.get("kind")
        output = config.get("output", "probabilities")
        if not isinstance(kind, str) or not isinstance(output, str):
            raise ConfigError("'kind' and 'output' must be strings")
        return cls(
            kind=kind,
            epsilon=_number(config, "epsilon"),
            sensitivity=_number(config, "sensitivity"),
            delta=_number(config, "delta", 0.0),
            output=output,
        )

    @property
    def scale(self) -> float:
        """Laplace ``b = Δ₁/ε``; Gaussian ``sigma = Δ₂·sqrt(2 ln(1.25/δ))/ε``."""
        if self.kind == "laplace":
            return self.sensitivity / self.epsilon
        return self.sensitivity * math.sqrt(2.0 * math.log(1.25 / self.delta)) / self.epsilon

    @property
    def variance(self) -> float:
        """Per-coordinate noise variance (Laplace ``2b²``, Gaussian ``sigma²``)."""
        return 2.0 * self.scale**2 if self.kind == "laplace" else self.scale**2

    def cost(self, rows: int = 1) -> tuple[float, float]:
        """(ε, δ) spent by an answer of ``rows`` rows under basic composition (δ: ``1 - (1-δ)^rows``)."""
        if rows < 0:
            raise ValueError("rows must not be negative")
        return self.epsilon * rows, 1.0 - (1.0 - self.delta) ** rows

    def noise(self, shape: tuple[int, ...], rng: np.random.Generator) -> FloatArray:
        if self.kind == "laplace":
            return rng.laplace(0.0, self.scale, size=shape)
        return rng.normal(0.0, self.scale, size=shape)

    def apply(self, outputs: npt.ArrayLike, *, rng: np.random.Generator) -> FloatArray:
        """Noisy copy of ``[batch, n]`` (or ``[n]``) answers, post-processed for ``output``."""
        x = np.asarray(outputs, dtype=np.float64)
        noisy = x + self.noise(x.shape, rng)
        if self.output == "probabilities":
            noisy = np.clip(noisy, 0.0, 1.0)
            total = noisy.sum(axis=-1, keepdims=True)
            uniform = np.full_like(noisy, 1.0 / noisy.shape[-1])
            return np.where(total > 0, noisy / np.where(total > 0, total, 1.0), uniform)
        norms_in = np.linalg.norm(x, axis=-1, keepdims=True)
        norms_out = np.linalg.norm(noisy, axis=-1, keepdims=True)
        unit = np.abs(norms_in - 1.0) < 1e-3
        return np.where(unit & (norms_out > 0), noisy / np.where(norms_out > 0, norms_out, 1.0), noisy)


@dataclass(frozen=True)
class BudgetPolicy:
    """A subject's privacy budget per period."""

    #: total ε per period, > 0
    epsilon: float
    #: total δ per period, in [0, 1)
    delta: float = 0.0
    #: refill period in seconds, aligned to the clock's epoch (86400: every UTC midnight)
    period_s: float = 86_400.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError("budget epsilon must be a positive number")
        if not 0 <= self.delta < 1:
            raise ConfigError("budget delta must be within [0, 1)")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError("period_s must be a positive number")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BudgetPolicy:
        unknown = set(config) - {"epsilon", "delta", "period_s"}
        if unknown:
            raise ConfigError(f"unknown privacy budget key(s): {sorted(unknown)}")
        return cls(
            epsilon=_number(config, "epsilon"),
            delta=_number(config, "delta", 0.0),
            period_s=_number(config, "period_s", 86_400.0),
        )

    def admits(self, mechanism: PrivacyMechanism) -> bool:
        """Whether one answer of ``mechanism`` fits in a full budget (check this when loading config)."""
        eps, delta = mechanism.cost(1)
        return eps <= self.epsilon * (1 + TOLERANCE) and delta <= self.delta * (1 + TOLERANCE)


@dataclass(frozen=True)
class BudgetState:
    """What is left of a subject's budget in the current period (for the audit record)."""

    remaining_epsilon: float
    remaining_delta: float
    #: seconds until the budget is full again
    refill_in_s: float


@dataclass
class _Spent:
    period: int
    epsilon: float = 0.0
    one_minus_delta: float = 1.0  # Π(1 - δᵢ): δ spent = 1 - this


class PrivacyBudget:
    """Per-subject (ε, δ) budgets, refilled every period (see the module docstring for the guarantees)."""

    def __init__(self, policy: BudgetPolicy, *, clock: Clock = utc_now, max_subjects: int = 10_000) -> None:
        # LRU-bounded, ConfigError for max_subjects < 1; only used under self._lock
        self._spent: SubjectTable[_Spent] = SubjectTable(max_subjects)
        self._policy = policy
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._spent)

    def _now(self) -> tuple[int, float]:
        ts = self._clock().timestamp()
        period = math.floor(ts / self._policy.period_s)
        return period, (period + 1) * self._policy.period_s - ts

    def _state(self, spent: _Spent | None, refill_in: float) -> BudgetState:
        eps = 0.0 if spent is None else spent.epsilon
        delta = 0.0 if spent is None else 1.0 - spent.one_minus_delta
        return BudgetState(
            remaining_epsilon=max(0.0, self._policy.epsilon - eps),
            remaining_delta=max(0.0, self._policy.delta - delta),
            refill_in_s=refill_in,
        )

    def remaining(self, subject: str) -> BudgetState:
        """The subject's budget left in the current period (does not count as use for LRU)."""
        period, refill_in = self._now()
        with self._lock:
            spent = self._spent.peek(subject)
            return self._state(spent if spent is not None and spent.period >= period else None, refill_in)

    def spend(self, subject: str, epsilon: float, delta: float = 0.0) -> BudgetState:
        """Spend (ε, δ) for ``subject`` or raise :class:`QuotaExceededError` (``privacy-budget``)."""
        if not (epsilon >= 0 and 0 <= delta < 1):
            raise ValueError("epsilon must be >= 0 and delta within [0, 1)")
        period, refill_in = self._now()
        with self._lock:
            # the least recently charged is evicted beyond max_subjects and starts over with a full budget
            spent = self._spent.get_or_create(subject, lambda: _Spent(period=period))
            if period > spent.period:  # a new period (a clock step back keeps the old one: no refill)
                spent.period, spent.epsilon, spent.one_minus_delta = period, 0.0, 1.0
            new_eps = spent.epsilon + epsilon
            new_omd = spent.one_minus_delta * (1.0 - delta)
            over_eps = new_eps > self._policy.epsilon * (1 + TOLERANCE)
            over_delta = (1.0 - new_omd) > self._policy.delta * (1 + TOLERANCE) + 1e-15
            if over_eps or over_delta:
                raise QuotaExceededError("privacy-budget", retry_after_s=refill_in)
            spent.epsilon, spent.one_minus_delta = new_eps, new_omd
            return self._state(spent, refill_in)
