"""Calibrated noise and per-subject privacy budgets (spent, enforced, refilled, bounded)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fakes import FakeClock

from nitrovault.errors import ConfigError, QuotaExceededError
from nitrovault.protection import BudgetPolicy, PrivacyBudget, PrivacyMechanism

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)  # where the fake clock starts


def test_scales_match_the_stated_formulas() -> None:
    lap = PrivacyMechanism(kind="laplace", epsilon=0.5, sensitivity=2.0)
    assert lap.scale == pytest.approx(4.0)
    assert lap.variance == pytest.approx(2 * 4.0**2)
    gau = PrivacyMechanism(kind="gaussian", epsilon=0.5, delta=1e-5, sensitivity=math.sqrt(2))
    sigma = math.sqrt(2) * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5  # Dwork & Roth Thm A.1
    assert gau.scale == pytest.approx(sigma)
    assert gau.variance == pytest.approx(sigma**2)


def test_empirical_noise_has_the_calibrated_spread() -> None:
    rng = np.random.default_rng(0)
    for mech in (
        PrivacyMechanism(kind="laplace", epsilon=1.0, sensitivity=0.1, output="embedding"),
        PrivacyMechanism(kind="gaussian", epsilon=0.9, delta=1e-6, sensitivity=0.1, output="embedding"),
    ):
        noise = mech.noise((200_000,), rng)
        assert noise.var() == pytest.approx(mech.variance, rel=0.03)


def test_probabilities_stay_distributions_and_embeddings_stay_unit() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(10), size=100)
    q = PrivacyMechanism(kind="laplace", epsilon=1.0, sensitivity=2.0).apply(p, rng=rng)
    assert q.shape == p.shape and np.all(q >= 0) and np.allclose(q.sum(axis=1), 1.0)
    assert not np.allclose(q, p)
    e = rng.normal(size=(20, 32))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    mech = PrivacyMechanism(kind="gaussian", epsilon=0.5, delta=1e-6, sensitivity=0.01, output="embedding")
    out = mech.apply(e, rng=rng)
    assert out.shape == e.shape and np.allclose(np.linalg.norm(out, axis=1), 1.0)


def test_noise_can_change_the_argmax_as_documented() -> None:
    rng = np.random.default_rng(2)
    p = np.tile(np.array([0.55, 0.45]), (500, 1))
    q = PrivacyMechanism(kind="laplace", epsilon=1.0, sensitivity=2.0).apply(p, rng=rng)
    assert np.any(q.argmax(axis=1) != 0)


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "exponential", "epsilon": 1, "sensitivity": 1},
        {"kind": "laplace", "epsilon": 0, "sensitivity": 1},
        {"kind": "laplace", "epsilon": 1, "sensitivity": -1},
        {"kind": "laplace", "epsilon": 1, "sensitivity": 1, "delta": 0.1},
        {"kind": "gaussian", "epsilon": 0.5, "sensitivity": 1},
        {"kind": "gaussian", "epsilon": 1.5, "delta": 1e-5, "sensitivity": 1},
        {"kind": "laplace", "epsilon": 1, "sensitivity": 1, "clip": True},
        {"kind": "laplace", "epsilon": "1", "sensitivity": 1},
    ],
)
def test_bad_mechanisms_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PrivacyMechanism.from_config(config)


def test_budget_runs_out_and_refills_at_the_next_period() -> None:
    clock = FakeClock(T0)
    budget = PrivacyBudget(BudgetPolicy(epsilon=1.0, period_s=86_400), clock=clock)
    for _ in range(10):
        budget.spend("alice", 0.1)  # ten spends of 0.1 exactly fit despite float rounding
    with pytest.raises(QuotaExceededError) as info:
        budget.spend("alice", 0.1)
    assert info.value.reason == "privacy-budget"
    assert info.value.retry_after_s == pytest.approx(12 * 3600)  # to the next UTC midnight
    budget.spend("bob", 0.5)  # other subjects are independent
    clock.now += timedelta(hours=11, minutes=59)
    with pytest.raises(QuotaExceededError):
        budget.spend("alice", 0.1)
    clock.now += timedelta(minutes=1)
    state = budget.spend("alice", 0.1)
    assert state.remaining_epsilon == pytest.approx(0.9)


def test_refused_spend_consumes_nothing_and_clock_step_back_does_not_refill() -> None:
    clock = FakeClock(T0)
    budget = PrivacyBudget(BudgetPolicy(epsilon=1.0), clock=clock)
    budget.spend("a", 0.8)
    with pytest.raises(QuotaExceededError):
        budget.spend("a", 0.3)
    assert budget.remaining("a").remaining_epsilon == pytest.approx(0.2)
    clock.now -= timedelta(days=2)
    with pytest.raises(QuotaExceededError):
        budget.spend("a", 0.3)


def test_delta_budget_composes_sequentially() -> None:
    clock = FakeClock(T0)
    mech = PrivacyMechanism(kind="gaussian", epsilon=0.1, delta=1e-6, sensitivity=1.0)
    policy = BudgetPolicy(epsilon=100.0, delta=5e-6)
    budget = PrivacyBudget(policy, clock=clock)
    for _ in range(4):
        budget.spend("s", *mech.cost(1))
    total_eps, total_delta = 4 * 0.1, 1 - (1 - 1e-6) ** 4  # basic composition (diffprivlib, slack 0)
    left = budget.remaining("s")
    assert policy.epsilon - left.remaining_epsilon == pytest.approx(total_eps)
    assert policy.delta - left.remaining_delta == pytest.approx(total_delta, rel=1e-9)
    with pytest.raises(QuotaExceededError):
        budget.spend("s", *mech.cost(2))  # delta would exceed 5e-6 (epsilon would not)
    budget.spend("s", *mech.cost(1))


def test_batch_cost_and_admits() -> None:
    mech = PrivacyMechanism(kind="laplace", epsilon=0.5, sensitivity=2.0)
    assert mech.cost(4) == (2.0, 0.0)
    assert BudgetPolicy(epsilon=1.0).admits(mech)
    assert not BudgetPolicy(epsilon=0.4).admits(mech)
    with pytest.raises(ConfigError):
        BudgetPolicy.from_config({"epsilon": 1.0, "refill": "daily"})


def test_subjects_are_bounded_with_lru_eviction() -> None:
    clock = FakeClock(T0)
    budget = PrivacyBudget(BudgetPolicy(epsilon=1.0), clock=clock, max_subjects=3)
    for s in ("a", "b", "c"):
        budget.spend(s, 1.0)
    budget.spend("d", 0.5)  # evicts "a", the least recently charged
    assert len(budget) == 3
    budget.spend("a", 1.0)  # starts over with a full budget (documented)
    with pytest.raises(QuotaExceededError):
        budget.spend("c", 0.1)  # "c" was not evicted ("b" was, by "a")
