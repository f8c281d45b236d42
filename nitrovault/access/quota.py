"""Per-subject quotas, enforced in the enclave: a token bucket for the rate, daily request and item counts.

Invariants:

* a call is charged all-or-nothing: a refused call consumes nothing;
* in any interval of ``t`` seconds a subject is granted at most ``burst + rate_per_s * t`` calls (token
  bucket, refilled continuously, capped at ``burst``), and per UTC day at most ``daily_requests`` calls
  and ``daily_items`` items; the daily windows reset at UTC midnight of the injected ``clock``;
* a refusal raises :class:`~nitrovault.errors.QuotaExceededError` with ``retry_after_s``: the least time
  after which the same call would be accepted (rate: until the bucket holds one token; daily: until the
  next UTC midnight). ``reason`` is ``rate``, ``daily-requests`` or ``daily-items`` (audit log only);
* a streamed call (Generate) is charged one request when it is admitted, then ``request=False``
  "continuation" charges of items only (one per generated token): they take no token from the bucket and
  count no daily request, only items, so they are refused (``daily-items``) only when the day's items run
  out, and the stream stops there;
* memory is bounded: at most ``max_subjects`` subjects are tracked; beyond that the least recently
  charged subject is evicted (LRU) and starts over with a **fresh bucket** and zero daily counts;
* the ledger is thread-safe (one lock; a charge is a few dict operations).

This ledger keeps its counters in enclave memory, so an enclave restart (which the parent can force)
resets them and so does LRU eviction, and every enclave of a fleet counts alone. Deployments therefore
name a shared state store in the measured config, and the enclave charges
:class:`nitrovault.state.SharedQuotaLedger` instead: the same rules (this class is its reference, and
``tests/unit/test_shared_limits.py`` replays random workloads against both), kept where neither a restart
nor a second enclave resets them (``docs/access-and-audit.md``, "Shared limits"). This in-memory ledger
serves configs without a store (tests, single-instance trials) and documents the rules.
The parent may add coarse per-connection limits of its own; they can only make things stricter.

Clock steps backwards are treated as "no time passed" (the bucket never refills from a clock jump back).

Example::

    tiers = QuotaTiers({"free": QuotaPolicy(1.0, 5, 1000, 10_000)}, default="free")
    ledger = QuotaLedger(tiers)
    state = ledger.charge("alice", None, items=3)
    state = ledger.charge("alice", None, items=1, request=False)  # one more streamed token
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError, PermissionDeniedError, QuotaExceededError
from nitrovault.subjects import SubjectTable

__all__ = ["QuotaLedger", "QuotaPolicy", "QuotaState", "QuotaTiers"]




@dataclass(frozen=True)
class QuotaPolicy:
    """One tier's limits."""

    #: sustained calls per second (token refill rate), > 0
    rate_per_s: float
    #: bucket size: calls that may arrive at once after an idle period, >= 1
    burst: int
    #: calls per UTC day; ``None``: unlimited
    daily_requests: int | None = None
    #: items (texts, rows) per UTC day; ``None``: unlimited
    daily_items: int | None = None

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ConfigError("rate_per_s must be positive")
        if self.burst < 1:
            raise ConfigError("burst must be at least 1")
        for name in ("daily_requests", "daily_items"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative")


@dataclass(frozen=True)
class QuotaTiers:
    """Tier name -> policy, and the tier of tokens without a ``tier`` claim (from the measured config)."""

    tiers: Mapping[str, QuotaPolicy]
    default: str

    def __post_init__(self) -> None:
        if self.default not in self.tiers:
            raise ConfigError(f"default tier {self.default!r} is not one of the tiers")
        object.__setattr__(self, "tiers", MappingProxyType(dict(self.tiers)))

    def resolve(self, tier: str | None) -> QuotaPolicy:
        """The policy for a token's tier claim. A tier the config does not know is refused (fail closed:
        the issuer and the enclave config disagree), with reason ``unknown-tier``."""
        name = self.default if tier is None else tier
        policy = self.tiers.get(name)
        if policy is None:
            raise PermissionDeniedError("unknown-tier")
        return policy


@dataclass(frozen=True)
class QuotaState:
    """What is left after a charge (for the audit record)."""

    remaining_requests: int | None  #: today; ``None``: unlimited
    remaining_items: int | None  #: today; ``None``: unlimited
    tokens: float  #: left in the bucket


@dataclass
class _Account:
    tokens: float
    last: datetime
    day: date
    requests: int = 0
    items: int = 0


def _next_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


class QuotaLedger:
    """Charges calls against per-subject quotas (see the module docstring for the guarantees)."""

    def __init__(self, policies: QuotaTiers, *, clock: Clock = utc_now, max_subjects: int = 10_000) -> None:
        # LRU-bounded, ConfigError for max_subjects < 1; only used under self._lock
        self._accounts: SubjectTable[_Account] = SubjectTable(max_subjects)
        self._policies = policies
        self._clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._accounts)

    def charge(self, subject: str, tier: str | None, items: int = 1, *, request: bool = True) -> QuotaState:
        """Charge one call of ``items`` items to ``subject`` or raise :class:`QuotaExceededError`.

        ``request=False`` is the "continuation" charge of a streamed call (the call itself was charged
        with ``request=True`` when it was admitted; each generated token is then charged as an item): it
        takes no token from the bucket and counts no daily request, only adds ``items`` to the day's
        items, and is refused only with ``daily-items`` (retry after the next UTC midnight). The bucket
        still refills as usual; all or nothing as any charge."""
        if items < 0:
            raise ConfigError("items must not be negative")
        policy = self._policies.resolve(tier)
        now = self._clock().astimezone(UTC)
        with self._lock:
            # least recently charged evicted beyond max_subjects: starts fresh if it returns
            account = self._accounts.get_or_create(
                subject, lambda: _Account(tokens=float(policy.burst), last=now, day=now.date()))
            self._refill(account, policy, now)
            refusals: list[tuple[float, str]] = []
            if request and account.tokens < 1.0:
                refusals.append(((1.0 - account.tokens) / policy.rate_per_s, "rate"))
            until_midnight = (_next_midnight(now) - now).total_seconds()
            if request and policy.daily_requests is not None and account.requests + 1 > policy.daily_requests:
                refusals.append((until_midnight, "daily-requests"))
            if policy.daily_items is not None and account.items + items > policy.daily_items:
                refusals.append((until_midnight, "daily-items"))
            if refusals:
                retry_after, reason = max(refusals)
                raise QuotaExceededError(reason, retry_after_s=retry_after)
            if request:
                account.tokens -= 1.0
                account.requests += 1
            account.items += items
            return QuotaState(
                remaining_requests=None if policy.daily_requests is None
                else policy.daily_requests - account.requests,
                remaining_items=None if policy.daily_items is None else policy.daily_items - account.items,
                tokens=account.tokens,
            )

    @staticmethod
    def _refill(account: _Account, policy: QuotaPolicy, now: datetime) -> None:
        elapsed = max(0.0, (now - account.last).total_seconds())
        account.tokens = min(float(policy.burst), account.tokens + elapsed * policy.rate_per_s)
        account.last = max(account.last, now)
        if now.date() > account.day:
            account.day = now.date()
            account.requests = 0
            account.items = 0
