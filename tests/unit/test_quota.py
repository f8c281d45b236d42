"""Quotas with a fake clock: token bucket, daily windows, tiers, bounded memory."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from fakes import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from nitrovault.access.quota import QuotaLedger, QuotaPolicy, QuotaTiers
from nitrovault.errors import ConfigError, PermissionDeniedError, QuotaExceededError


def ledger(policy: QuotaPolicy, clock: FakeClock, **kwargs: int) -> QuotaLedger:
    return QuotaLedger(QuotaTiers({"default": policy}, default="default"), clock=clock, **kwargs)


def test_burst_then_exhaustion_with_accurate_retry_after() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=2.0, burst=3), clock)
    states = [q.charge("alice", None) for _ in range(3)]
    assert [s.tokens for s in states] == [2.0, 1.0, 0.0]
    with pytest.raises(QuotaExceededError) as info:
        q.charge("alice", None)
    assert info.value.reason == "rate"
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert str(info.value) == "quota exceeded"
    clock.advance(0.49)
    with pytest.raises(QuotaExceededError) as again:
        q.charge("alice", None)
    assert again.value.retry_after_s == pytest.approx(0.01)
    clock.advance(0.01)
    q.charge("alice", None)  # exactly when the hint said


def test_refusal_consumes_nothing_and_refill_caps_at_burst() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=2), clock)
    q.charge("a", None)
    q.charge("a", None)
    for _ in range(5):
        with pytest.raises(QuotaExceededError):
            q.charge("a", None)
    clock.advance(1000)
    assert q.charge("a", None).tokens == 1.0  # capped at burst 2, minus this call


def test_subjects_are_independent() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=1), clock)
    q.charge("a", None)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)
    q.charge("b", None)


def test_daily_requests_reset_at_utc_midnight() -> None:
    clock = FakeClock(datetime(2025, 3, 1, 23, 59, 0, tzinfo=UTC))
    q = ledger(QuotaPolicy(rate_per_s=100.0, burst=100, daily_requests=2), clock)
    assert q.charge("a", None).remaining_requests == 1
    assert q.charge("a", None).remaining_requests == 0
    with pytest.raises(QuotaExceededError) as info:
        q.charge("a", None)
    assert info.value.reason == "daily-requests"
    assert info.value.retry_after_s == pytest.approx(60.0)
    clock.advance(59.9)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)
    clock.advance(0.1)  # 00:00:00 UTC
    assert q.charge("a", None).remaining_requests == 1


def test_daily_items() -> None:
    clock = FakeClock(datetime(2025, 3, 1, 0, 0, 0, tzinfo=UTC))
    q = ledger(QuotaPolicy(rate_per_s=100.0, burst=100, daily_items=10), clock)
    assert q.charge("a", None, items=7).remaining_items == 3
    with pytest.raises(QuotaExceededError) as info:
        q.charge("a", None, items=4)
    assert info.value.reason == "daily-items"
    assert info.value.retry_after_s == pytest.approx(86400.0)
    assert q.charge("a", None, items=3).remaining_items == 0


def test_a_continuation_charge_takes_no_token_and_counts_no_request() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=2.0, burst=1, daily_requests=1, daily_items=100), clock)
    admitted = q.charge("a", None, items=0)  # the Generate call: one request, the bucket's only token
    assert (admitted.tokens, admitted.remaining_requests, admitted.remaining_items) == (0.0, 0, 100)
    for n in range(1, 6):  # one generated token each: neither the empty bucket nor the day's requests stop it
        state = q.charge("a", None, items=1, request=False)
        assert (state.tokens, state.remaining_requests, state.remaining_items) == (0.0, 0, 100 - n)
    with pytest.raises(QuotaExceededError) as info:
        q.charge("a", None, items=0)  # a new call is still refused: the continuations spent nothing of it
    assert info.value.reason == "daily-requests"
    clock.advance(0.25)
    assert q.charge("a", None, items=2, request=False).tokens == pytest.approx(0.5)  # refilled as usual
    assert q.charge("new", None, items=1, request=False).tokens == 1.0  # a new subject: a full bucket


def test_a_continuation_charge_is_refused_for_daily_items_until_midnight_all_or_nothing() -> None:
    clock = FakeClock(datetime(2025, 3, 1, 23, 0, 0, tzinfo=UTC))
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=2, daily_requests=5, daily_items=5), clock)
    q.charge("a", None, items=1)
    assert q.charge("a", None, items=3, request=False).remaining_items == 1
    with pytest.raises(QuotaExceededError) as info:
        q.charge("a", None, items=2, request=False)
    assert info.value.reason == "daily-items"
    assert info.value.retry_after_s == pytest.approx(3600.0)
    state = q.charge("a", None, items=1, request=False)  # the refused charge took nothing
    assert (state.tokens, state.remaining_requests, state.remaining_items) == (1.0, 4, 0)
    with pytest.raises(QuotaExceededError) as again:
        q.charge("a", None, items=1, request=False)
    assert again.value.reason == "daily-items"
    clock.advance(3599.5)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None, items=1, request=False)
    clock.advance(0.5)  # 00:00:00 UTC: the day's items start over
    state = q.charge("a", None, items=4, request=False)
    assert (state.remaining_requests, state.remaining_items) == (5, 1)
    with pytest.raises(ConfigError):
        q.charge("a", None, items=-1, request=False)


def test_a_stream_stops_exactly_when_the_daily_items_run_out() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=1, daily_items=20), clock)
    q.charge("a", None, items=0)
    generated = 0
    while True:
        clock.advance(0.01)
        try:
            q.charge("a", None, items=1, request=False)
        except QuotaExceededError as exc:
            assert exc.reason == "daily-items"
            break
        generated += 1
    assert generated == 20


def test_midnight_uses_utc_even_for_other_offsets() -> None:
    # 04:00 on March 2 at +05:00 is 23:00 on March 1 UTC: one hour to the UTC midnight
    local = datetime(2025, 3, 1, 23, 0, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=5)))
    clock = FakeClock(local)
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=1, daily_requests=1), clock)
    q.charge("a", None)
    with pytest.raises(QuotaExceededError) as info:
        q.charge("a", None)
    assert info.value.retry_after_s == pytest.approx(3600.0)


def test_tiers_and_unknown_tier() -> None:
    clock = FakeClock()
    tiers = QuotaTiers({"free": QuotaPolicy(1.0, 1), "gold": QuotaPolicy(10.0, 5)}, default="free")
    q = QuotaLedger(tiers, clock=clock)
    q.charge("f", None)
    with pytest.raises(QuotaExceededError):
        q.charge("f", None)  # default tier: burst 1
    for _ in range(5):
        q.charge("g", "gold")
    with pytest.raises(QuotaExceededError):
        q.charge("g", "gold")
    with pytest.raises(PermissionDeniedError) as info:
        q.charge("x", "platinum")
    assert info.value.reason == "unknown-tier"
    with pytest.raises(ConfigError):
        QuotaTiers({"free": QuotaPolicy(1.0, 1)}, default="gold")


def test_tier_downgrade_clamps_bucket() -> None:
    clock = FakeClock()
    tiers = QuotaTiers({"free": QuotaPolicy(1.0, 1), "gold": QuotaPolicy(10.0, 5)}, default="free")
    q = QuotaLedger(tiers, clock=clock)
    q.charge("a", "gold")  # 4 tokens left in the gold bucket
    q.charge("a", "free")  # clamped to the free burst of 1, then charged
    with pytest.raises(QuotaExceededError):
        q.charge("a", "free")


def test_eviction_bound_and_fresh_bucket() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=0.001, burst=1), clock, max_subjects=3)
    for name in ("a", "b", "c"):
        q.charge(name, None)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)  # "a" is now most recently used
    q.charge("d", None)  # evicts the least recently used: "b"
    assert len(q) == 3
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)  # "a" kept its state
    q.charge("b", None)  # "b" was evicted: fresh bucket (documented)
    for i in range(100):
        q.charge(f"s{i}", None)
    assert len(q) == 3


def test_clock_going_backwards_does_not_refill() -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=1.0, burst=1), clock)
    q.charge("a", None)
    clock.advance(-3600)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)
    clock.advance(3600)
    with pytest.raises(QuotaExceededError):
        q.charge("a", None)  # time "last" did not move back: still no refill yet
    clock.advance(1)
    q.charge("a", None)


def test_policy_validation() -> None:
    with pytest.raises(ConfigError):
        QuotaPolicy(rate_per_s=0, burst=1)
    with pytest.raises(ConfigError):
        QuotaPolicy(rate_per_s=1, burst=0)
    with pytest.raises(ConfigError):
        QuotaPolicy(rate_per_s=1, burst=1, daily_items=-1)
    with pytest.raises(ConfigError):
        ledger(QuotaPolicy(1, 1), FakeClock()).charge("a", None, items=-1)


def test_thread_safe_no_over_grant() -> None:
    q = ledger(QuotaPolicy(rate_per_s=1e-6, burst=50), FakeClock())
    granted = []

    def worker() -> None:
        for _ in range(40):
            try:
                q.charge("shared", None)
                granted.append(1)
            except QuotaExceededError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 50


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_t(rate: float, burst: int, gaps: list[float]) -> None:
    clock = FakeClock()
    q = ledger(QuotaPolicy(rate_per_s=rate, burst=burst), clock)
    accepted: list[datetime] = []
    for gap in gaps:
        clock.advance(gap)
        try:
            q.charge("s", None)
            accepted.append(clock.now)
        except QuotaExceededError as exc:
            assert exc.retry_after_s > 0
    # every window [accepted[i], accepted[j]] holds at most burst + rate * t grants
    for i in range(len(accepted)):
        for j in range(i, len(accepted)):
            t = (accepted[j] - accepted[i]).total_seconds()
            assert j - i + 1 <= burst + rate * t + 1e-6
