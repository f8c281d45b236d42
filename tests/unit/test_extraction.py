"""Extraction detection: flags synthetic extraction patterns, stays quiet on natural ones, bounded state."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fakes import FakeClock
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from nitrovault.errors import ConfigError, PermissionDeniedError, QuotaExceededError
from nitrovault.protection import Action, ExtractionMonitor, ExtractionPolicy, PradaDetector

T0 = datetime(2026, 3, 1, tzinfo=UTC)  # where the fake clock starts


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def _label(x: np.ndarray, x_tr: np.ndarray, y_tr: np.ndarray) -> np.ndarray:
    """A 1-nearest-neighbour 'victim': deterministic and good enough to give labels."""
    d = ((x[:, None, :] - x_tr[None, :, :]) ** 2).sum(axis=2)
    return y_tr[d.argmin(axis=1)]


def _feed(monitor: ExtractionMonitor, clock: FakeClock, subject: str, x: np.ndarray, y: np.ndarray,
          pace_s: float = 1.0) -> dict[str, int]:
    first: dict[str, int] = {}
    for i in range(len(x)):
        decision = monitor.observe(subject, x[i : i + 1], y[i : i + 1])
        clock.now += timedelta(seconds=pace_s)
        for s in decision.signals:
            first.setdefault(s, i + 1)
        if decision.action is not Action.NONE:
            first.setdefault(decision.action.label, i + 1)
    return first


def _jacobian_walk(seeds: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    pool = list(seeds)
    while len(pool) < n + len(seeds):
        base = pool[int(rng.integers(len(pool)))]
        pool.append(np.clip(base + 0.05 * np.sign(rng.standard_normal(base.shape)), 0, 1))
    return np.asarray(pool[len(seeds):])


def test_prada_flags_perturbations_around_a_few_seeds(digits) -> None:
    x_tr, y_tr, _, _ = digits
    x = _jacobian_walk(x_tr[:10], 400, np.random.default_rng(0))
    detector = PradaDetector(threshold=0.9, min_samples=100)
    results = [detector.observe(row, int(label)) for row, label in zip(x, _label(x, x_tr, y_tr), strict=True)]
    assert results[98].w is None and not results[98].alarm  # not before min_samples
    assert results[-1].alarm and results[-1].w is not None and results[-1].w < 0.9


def test_prada_stays_quiet_on_natural_queries(digits) -> None:
    _, _, x_te, y_te = digits
    order = np.random.default_rng(1).permutation(len(x_te))[:300]
    detector = PradaDetector(threshold=0.9, min_samples=100)
    for i in order:
        result = detector.observe(x_te[i], int(y_te[i]))
    assert result.w is not None and result.w > 0.95 and not result.alarm


def test_prada_state_is_bounded() -> None:
    detector = PradaDetector(min_samples=10, growing_max=5, distances_max=50)
    rng = np.random.default_rng(2)
    for _ in range(500):
        detector.observe(rng.uniform(size=8), int(rng.integers(3)))
    assert detector.stored_inputs <= 3 * 5
    assert len(detector.distances) == 50


def test_monitor_blocks_a_synthetic_attack_and_refuses_the_subject(digits) -> None:
    x_tr, y_tr, _, _ = digits
    clock = FakeClock(T0)
    monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=x_tr)
    x = _jacobian_walk(x_tr[:10], 300, np.random.default_rng(3))
    first = _feed(monitor, clock, "thief", x, _label(x, x_tr, y_tr))
    assert first["prada"] <= 300 and first["block"] == first["prada"]
    with pytest.raises(PermissionDeniedError) as info:
        monitor.admit("thief")
    assert info.value.reason == "extraction-blocked"
    monitor.admit("someone-else")
    clock.now += timedelta(seconds=ExtractionPolicy().block_s)
    monitor.admit("thief")  # the block has a configured end


def test_monitor_throttles_uniform_noise_through_coverage(digits) -> None:
    x_tr, y_tr, _, _ = digits
    clock = FakeClock(T0)
    monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=x_tr)
    x = np.random.default_rng(4).uniform(size=(150, 64))
    first = _feed(monitor, clock, "noise", x, _label(x, x_tr, y_tr))
    assert first["coverage"] <= 150 and "prada" not in first  # PRADA alone misses uniform noise
    decision = monitor.observe("noise", x[:1], np.array([0]))
    assert decision.action is Action.THROTTLE and decision.evidence["coverage_novel"] > 0.9  # type: ignore[operator]
    with pytest.raises(QuotaExceededError) as info:
        monitor.admit("noise")
    assert info.value.reason == "extraction-throttled" and 0 < info.value.retry_after_s <= 60
    err = decision.error()
    assert isinstance(err, QuotaExceededError)


def test_monitor_stays_quiet_on_benign_subjects(digits) -> None:
    x_tr, _, x_te, y_te = digits
    clock = FakeClock(T0)
    monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=x_tr)
    for s in range(5):
        order = np.random.default_rng(10 + s).permutation(len(x_te))[:200]
        first = _feed(monitor, clock, f"user{s}", x_te[order], y_te[order], pace_s=10)
        assert first == {}, first
        monitor.admit(f"user{s}")


def test_near_duplicate_bursts_and_volume_are_signals() -> None:
    clock = FakeClock(T0)
    policy = ExtractionPolicy(volume_max=50, volume_window_s=60, prada_min_samples=1000, distances_max=1000)
    monitor = ExtractionMonitor(policy, clock=clock)
    rng = np.random.default_rng(5)
    base = rng.uniform(size=16)
    x = base + rng.normal(0, 1e-4, size=(40, 16))  # the same query, again and again (averaging noise)
    first = _feed(monitor, clock, "dup", x, np.zeros(40, dtype=int), pace_s=0.1)
    assert "duplicates" in first and "throttle" in first
    spread = rng.uniform(size=(60, 16))
    first = _feed(monitor, clock, "fast", spread, np.zeros(60, dtype=int), pace_s=0.5)
    assert first.get("volume") == 51 and "duplicates" not in first
    slow = _feed(monitor, clock, "slow", spread, np.zeros(60, dtype=int), pace_s=2.0)
    assert "volume" not in slow


def test_evidence_is_numbers_only(digits) -> None:
    x_tr, y_tr, _, _ = digits
    monitor = ExtractionMonitor(ExtractionPolicy(), clock=FakeClock(T0), reference=x_tr)
    record = monitor.observe("s", x_tr[:3], y_tr[:3]).to_audit()
    assert record["action"] == "none" and record["queries"] == 3
    assert all(v is None or isinstance(v, int | float | str | list) for v in record.values())


def test_subject_state_and_blocks_are_bounded() -> None:
    clock = FakeClock(T0)
    policy = ExtractionPolicy(prada_min_samples=5, distances_max=20, growing_max=4, dup_window=8,
                              actions={"prada": Action.BLOCK, "duplicates": Action.NONE})
    monitor = ExtractionMonitor(policy, clock=clock, max_subjects=3)
    for s in range(10):
        monitor.observe(f"s{s}", np.zeros((8, 4)), np.zeros(8, dtype=int))  # identical: PRADA blocks
    assert len(monitor) == 3 and monitor.blocked == 3
    with pytest.raises(PermissionDeniedError):
        monitor.admit("s9")
    monitor.admit("s0")  # the oldest block was dropped when the list was full (documented)


@pytest.mark.parametrize(
    "config",
    [
        {"prada_threshold": 1.5},
        {"prada_feature": "hamming"},
        {"prada_min_samples": 2},
        {"actions": {"prada": "explode"}},
        {"actions": {"telepathy": "block"}},
        {"volume_max": 0},
        {"unknown": 1},
    ],
)
def test_bad_policies_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ExtractionPolicy.from_config(config)


def test_policy_from_config_maps_actions() -> None:
    policy = ExtractionPolicy.from_config({"actions": {"coverage": "record"}, "block_s": 3600})
    assert policy.actions["coverage"] is Action.RECORD and policy.actions["prada"] is Action.BLOCK
    assert policy.block_s == 3600


def test_the_normality_test_runs_every_test_every_distances_even_after_the_list_is_full() -> None:
    rng = np.random.default_rng(5)
    detector = PradaDetector(min_samples=20, distances_max=30, test_every=5)
    tested: list[int] = []
    last = None
    for i in range(80):
        result = detector.observe(rng.normal(size=4), 0)
        if result.w is not None and result is not last:
            tested.append(i)
        last = result
    assert tested[0] == 20  # at once when min_samples is reached (the first input only seeds the set)
    assert all(b - a == 5 for a, b in itertools.pairwise(tested))  # then every 5 distances
    assert tested[-1] >= 75  # still testing after the list saturated at distances_max
    with pytest.raises(ConfigError):
        PradaDetector(test_every=0)
