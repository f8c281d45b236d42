"""Quotas, privacy budgets and extraction refusals kept in the shared state store, charged atomically.

Each class here has the interface and the invariants of its in-memory twin, which stays the reference
(and what an enclave without a store uses):

* :class:`SharedQuotaLedger` — :class:`nitrovault.access.QuotaLedger` (token bucket, daily requests and
  items per UTC day, refusal reasons ``rate`` / ``daily-requests`` / ``daily-items`` with
  ``retry_after_s``; a clock step back refills nothing; ``request=False`` charges items only, the
  continuation of a streamed call);
* :class:`SharedPrivacyBudget` — :class:`nitrovault.protection.PrivacyBudget` (ε adds up, δ composes as
  ``1 - Π(1 - δᵢ)``, per period aligned to the epoch, refusal ``privacy-budget``);
* :class:`SharedRefusals` — the extraction monitor's blocks and throttles
  (:class:`nitrovault.protection.ExtractionMonitor`), so killing an enclave does not lift a block;
* :class:`SharedAggregates` — the monitor's per-subject windows (volume, near-duplicate flags, coverage
  cells), so a thief's queries count on every enclave and across restarts.

What changes is where the state lives, and that is the point:

* **Restarts reset nothing, and N enclaves share one budget.** Every charge is one server-side script
  (``EVALSHA``): it reads the subject's state, decides, and writes only when it admits, all in one atomic
  step of the store. However many enclaves race on one subject's last units, the store admits exactly
  the quota (``tests/integration/test_shared_limits_stack.py`` races 16 clients over two enclaves).
* **All or nothing.** A refused charge writes nothing (the refill is a function of time, recomputed on
  the next charge), so a refused call consumes nothing, as in memory.
* **Bounded memory without resets.** Keys expire (``PEXPIRE``) only once their state no longer matters:
  a quota's after the next UTC midnight plus the time to refill a full bucket, a budget's after its
  period. There is no LRU: the store must run with ``maxmemory-policy noeviction`` (the CDK app sets
  it), so a full store refuses writes (fail closed) instead of silently forgetting a subject's spend.
* **Fail closed.** A store failure raises :class:`~nitrovault.errors.StateStoreError`; the caller answers
  UNAVAILABLE (:class:`~nitrovault.errors.ProtectionUnavailableError`), never "unlimited".
* **Time is the enclave's** (the injected clock, passed to the script), not the store's: the enclave's
  clock comes from the Nitro hypervisor, which the parent does not control. Enclaves whose clocks
  disagree a little only ever see "no time passed" from each other's later stamps.

Numbers cross into Lua as decimal strings with 17 significant digits (exact for doubles) and back the
same way, so the scripts compute with the very doubles Python would.

Example::

    ledger = SharedQuotaLedger(store, tiers)
    state = ledger.charge("alice", None, items=3)   # raises QuotaExceededError, or StateStoreError
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nitrovault.access.quota import QuotaPolicy, QuotaState, QuotaTiers
from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError, PermissionDeniedError, QuotaExceededError, StateStoreError
from nitrovault.protection.extraction import ExtractionPolicy, Windows
from nitrovault.protection.privacy import TOLERANCE, BudgetPolicy, BudgetState
from nitrovault.state.store import StateStore

__all__ = [
    "Admitted",
    "SharedAdmission",
    "SharedAggregates",
    "SharedPrivacyBudget",
    "SharedQuotaLedger",
    "SharedRefusals",
]

#: the quota of an admission that charges none (only its type is needed)
_NO_QUOTA = QuotaPolicy(rate_per_s=1.0, burst=1)



def _num(value: float) -> str:
    return repr(float(value))  # shortest repr that round-trips a double; Lua's tonumber reads it exactly


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


# One call's admission, all or nothing: the extraction refusal in force, the quota charge and the privacy
# budget spend, each optional, decided together and written only when all of them admit.
# KEYS: the subject's refusal hash {kind, until}, quota hash {tokens, last, day, req, items},
#       budget hash {period, eps, omd}  (omd = Π(1 - δᵢ))
# ARGV[1] now_ms; ARGV[2] check refusals ('1'/'0')
# ARGV[3..8] quota: on, rate_per_ms, burst, daily_requests (-1: none), daily_items (-1: none), items
# ARGV[9..15] budget: on, period, eps_cost, omd_cost, eps_budget, delta_budget, tolerance; ARGV[16] its ttl;
# ARGV[17] soft ('1': a budget too small to spend refuses nothing here; the answer is refused later)
# ARGV[18] request ('1': a call, one bucket token and one daily request besides its items; '0': items only,
#          the continuation charge of a streamed call: no rate or daily-requests check, still refilled)
# -> {0, what ('x' | 'q' | 'b'), reason, retry_after_ms}   refused, nothing written
#    {1, requests, items, tokens, eps_spent, omd, spent}     admitted (-1 / '' for parts not asked;
#                                                           spent: '1' spent, '0' too small (soft), '')
_ADMIT = """
local now = tonumber(ARGV[1])
if ARGV[2] == '1' then
  local r = redis.call('HMGET', KEYS[1], 'kind', 'until')
  if r[1] and tonumber(r[2]) > now then
    return {0, 'x', r[1], string.format('%.17g', tonumber(r[2]) - now)}
  end
end
local quota = ARGV[3] == '1'
local tokens, last, sday, req, used, midnight, rate, burst
if quota then
  rate = tonumber(ARGV[4])
  burst = tonumber(ARGV[5])
  local dreq = tonumber(ARGV[6])
  local ditems = tonumber(ARGV[7])
  local items = tonumber(ARGV[8])
  local day = math.floor(now / 86400000)
  local s = redis.call('HMGET', KEYS[2], 'tokens', 'last', 'day', 'req', 'items')
  tokens = tonumber(s[1]) or burst
  last = tonumber(s[2]) or now
  sday = tonumber(s[3]) or day
  req = tonumber(s[4]) or 0
  used = tonumber(s[5]) or 0
  if now > last then
    tokens = math.min(burst, tokens + (now - last) * rate)
    last = now
  end
  if day > sday then
    sday = day
    req = 0
    used = 0
  end
  local request = ARGV[18] == '1'
  local retry, reason = -1, ''
  if request and tokens < 1.0 then
    retry, reason = (1.0 - tokens) / rate, 'rate'
  end
  midnight = (day + 1) * 86400000 - now
  if request and dreq >= 0 and req + 1 > dreq and midnight > retry then
    retry, reason = midnight, 'daily-requests'
  end
  if ditems >= 0 and used + items > ditems and midnight > retry then
    retry, reason = midnight, 'daily-items'
  end
  if retry >= 0 then
    return {0, 'q', reason, string.format('%.17g', retry)}
  end
  if request then
    tokens = tokens - 1.0
    req = req + 1
  end
  used = used + items
end
local budget = ARGV[9] == '1'
local spent = ''
local period, new_eps, new_omd
if budget then
  period = tonumber(ARGV[10])
  local s = redis.call('HMGET', KEYS[3], 'period', 'eps', 'omd')
  local sp = tonumber(s[1])
  local eps, omd = 0.0, 1.0
  if sp ~= nil and sp >= period then
    eps = tonumber(s[2])
    omd = tonumber(s[3])
    period = sp
  end
  new_eps = eps + tonumber(ARGV[11])
  new_omd = omd * tonumber(ARGV[12])
  local tol = tonumber(ARGV[15])
  if new_eps > tonumber(ARGV[13]) * (1 + tol) or (1.0 - new_omd) > tonumber(ARGV[14]) * (1 + tol) + 1e-15 then
    if ARGV[17] ~= '1' then
      return {0, 'b', 'privacy-budget', '0'}
    end
    budget = false  -- soft: the rest is admitted, the answer will be refused for its budget
    spent = '0'
  end
end
if quota then
  redis.call('HSET', KEYS[2], 'tokens', string.format('%.17g', tokens), 'last', string.format('%.17g', last),
             'day', sday, 'req', req, 'items', used)
  redis.call('PEXPIRE', KEYS[2], math.ceil(midnight + burst / rate))
end
if budget then
  redis.call('HSET', KEYS[3], 'period', period, 'eps', string.format('%.17g', new_eps),
             'omd', string.format('%.17g', new_omd))
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[16]))
end
local r_tokens, r_eps, r_omd = '', '', ''
if quota then r_tokens = string.format('%.17g', tokens) else req, used = -1, -1 end
if budget then
  r_eps, r_omd = string.format('%.17g', new_eps), string.format('%.17g', new_omd)
  spent = '1'
end
return {1, req, used, r_tokens, r_eps, r_omd, spent}
"""

# Give back a spend whose answer was never released (the model failed, the call was refused after it).
# KEYS[1]: the budget hash; ARGV: period, eps_cost, omd_cost -> 1 refunded, 0 (another period: nothing)
_REFUND = """
local s = redis.call('HMGET', KEYS[1], 'period', 'eps', 'omd')
if tonumber(s[1]) ~= tonumber(ARGV[1]) then
  return 0
end
local eps = math.max(0.0, tonumber(s[2]) - tonumber(ARGV[2]))
local omd = math.min(1.0, tonumber(s[3]) / tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'eps', string.format('%.17g', eps), 'omd', string.format('%.17g', omd))
return 1
"""

# KEYS[1]: the subject's refusal hash; ARGV: kind ('block' | 'throttle'), until_ms, ttl_ms
# A block is never shortened or replaced by a throttle.
_REFUSE = """
local s = redis.call('HMGET', KEYS[1], 'kind', 'until')
local until_ms = tonumber(ARGV[2])
if s[1] == 'block' and ARGV[1] ~= 'block' and tonumber(s[2]) > until_ms then
  return 0
end
if s[1] and tonumber(s[2]) > until_ms and s[1] == ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'kind', ARGV[1], 'until', ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


# KEYS: the subject's volume zset, duplicate-flag list, coverage-cell list
# ARGV: now_ms, window_ms, volume_cap, nonce, dup_window, coverage_window, ttl_ms, flags ("0110"),
#       cells ("3,-1,7" or "")
# -> {volume, flags (string), cells (list of strings)}
_AGGREGATES = """
local now = tonumber(ARGV[1])
local flags = ARGV[8]
for i = 1, #flags do
  redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
local volume = redis.call('ZCARD', KEYS[1])
local ttl = tonumber(ARGV[7])
if #flags > 0 then
  local items = {}
  for i = 1, #flags do items[i] = string.sub(flags, i, i) end
  redis.call('RPUSH', KEYS[2], unpack(items))
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
end
if ARGV[9] ~= '' then
  local cells = {}
  for c in string.gmatch(ARGV[9], '[^,]+') do cells[#cells + 1] = c end
  redis.call('RPUSH', KEYS[3], unpack(cells))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {volume, table.concat(redis.call('LRANGE', KEYS[2], 0, -1)), redis.call('LRANGE', KEYS[3], 0, -1)}
"""


def _reply(value: object) -> list[object]:
    """A script's reply as a list, or :class:`StateStoreError` (the store answered something else)."""
    if not isinstance(value, list):
        raise StateStoreError("the state store answered a limit script unexpectedly")
    return [v.decode() if isinstance(v, bytes) else v for v in value]


@dataclass(frozen=True)
class Admitted:
    """What a call's admission left: the quota state, and the budget state when a spend was asked."""

    quota: QuotaState | None
    budget: BudgetState | None
    #: ``soft`` admissions: the budget was too small for the spend (nothing spent); refuse the answer
    budget_refused: bool = False
    #: seconds until the budget is full again (with ``budget_refused``: the refusal's retry-after)
    refill_in_s: float = 0.0


class SharedAdmission:
    """A call's limits in one atomic script and one round trip: the extraction refusal in force, the quota
    charge and the privacy-budget spend (each optional), written only when all of them admit.

    The rules are the in-memory ones (:class:`~nitrovault.access.QuotaLedger`,
    :class:`~nitrovault.protection.PrivacyBudget`, the monitor's blocks); refusals come in that order
    (a blocked subject is refused before it is charged). A spend whose answer is then not released (the
    model failed, the extraction monitor refused the answer) is given back with :meth:`refund`, so a
    refused answer costs no budget, as in memory.
    """

    def __init__(self, store: StateStore, tiers: QuotaTiers, budget: BudgetPolicy | None = None, *,
                 clock: Clock = utc_now) -> None:
        self._store = store
        self._tiers = tiers
        self._budget = budget
        self._clock = clock
        self._admit = store.script(_ADMIT)
        self._refund = store.script(_REFUND)

    def admit(self, subject: str, tier: str | None = None, items: int | None = 1, *,
              privacy: tuple[float, float] | None = None, refusals: bool = False,
              soft: bool = False, request: bool = True) -> Admitted:
        """Charge ``items`` to the quota (``None``: no quota charge), spend ``privacy`` = (ε, δ) from the
        budget (``None``: no spend) and, with ``refusals``, refuse a blocked or throttled subject; raises
        the in-memory twins' errors (:class:`StateStoreError` when the store cannot decide).

        ``soft``: a budget too small for ``privacy`` refuses nothing here; the rest is admitted and
        :attr:`Admitted.budget_refused` says so, so the caller can run what comes before the spend in
        memory (the extraction monitor observes a call before its privacy spend) and refuse then.

        ``request=False``: the quota charge is a "continuation" charge of items only (a streamed call's
        generated tokens, after the call itself was admitted with ``request=True``): no bucket token and
        no daily request, refused only with ``daily-items``, as :meth:`QuotaLedger.charge
        <nitrovault.access.QuotaLedger.charge>`."""
        at = self._clock()
        now = _ms(at.astimezone(UTC))
        quota_args: list[str | int | float] = ["0", 0, 0, 0, 0, 0]
        policy = None
        if items is not None:
            if items < 0:
                raise ConfigError("items must not be negative")
            policy = self._tiers.resolve(tier)
            quota_args = ["1", _num(policy.rate_per_s / 1000.0), policy.burst,
                          -1 if policy.daily_requests is None else policy.daily_requests,
                          -1 if policy.daily_items is None else policy.daily_items, items]
        budget_args: list[str | int | float] = ["0", 0, 0, 0, 0, 0, 0, 0, "0"]
        refill_in = 0.0
        budget = self._budget
        if privacy is not None:
            epsilon, delta = privacy
            if budget is None:
                raise ConfigError("a privacy spend needs a budget policy")
            if not (epsilon >= 0 and 0 <= delta < 1):
                raise ValueError("epsilon must be >= 0 and delta within [0, 1)")
            ts = at.timestamp()
            period = math.floor(ts / budget.period_s)
            refill_in = (period + 1) * budget.period_s - ts
            budget_args = ["1", period, _num(epsilon), _num(1.0 - delta), _num(budget.epsilon),
                           _num(budget.delta), _num(TOLERANCE), math.ceil(refill_in * 1000) + 1000,
                           "1" if soft else "0"]
        key = self._store.settings.key
        reply = _reply(self._admit([key(subject, "x"), key(subject, "q"), key(subject, "dp")],
                                   [now, "1" if refusals else "0", *quota_args, *budget_args,
                                    "1" if request else "0"]))
        try:
            if reply[0] == 0:
                what, reason, retry = str(reply[1]), str(reply[2]), float(str(reply[3])) / 1000.0
                if what == "x":
                    if reason == "block":
                        raise PermissionDeniedError("extraction-blocked")
                    raise QuotaExceededError("extraction-throttled", retry_after_s=retry)
                if what == "b":
                    raise QuotaExceededError("privacy-budget", retry_after_s=refill_in)
                raise QuotaExceededError(reason, retry_after_s=retry)
            quota = None
            if policy is not None:
                requests, used, tokens = int(str(reply[1])), int(str(reply[2])), float(str(reply[3]))
                quota = QuotaState(
                    remaining_requests=None if policy.daily_requests is None
                    else policy.daily_requests - requests,
                    remaining_items=None if policy.daily_items is None else policy.daily_items - used,
                    tokens=tokens)
            state = None
            if privacy is not None and budget is not None and str(reply[6]) == "0":
                return Admitted(quota=quota, budget=None, budget_refused=True, refill_in_s=refill_in)
            if privacy is not None and budget is not None:
                spent_eps, omd = float(str(reply[4])), float(str(reply[5]))
                state = BudgetState(remaining_epsilon=max(0.0, budget.epsilon - spent_eps),
                                    remaining_delta=max(0.0, budget.delta - (1.0 - omd)),
                                    refill_in_s=refill_in)
        except (IndexError, ValueError):
            raise StateStoreError("the state store answered a limit script unexpectedly") from None
        return Admitted(quota=quota, budget=state)

    def refund(self, subject: str, privacy: tuple[float, float]) -> None:
        """Give back a spend of ``privacy`` = (ε, δ) made by :meth:`admit` in the current period."""
        budget = self._budget
        if budget is None:
            raise ConfigError("a privacy refund needs a budget policy")
        epsilon, delta = privacy
        period = math.floor(self._clock().timestamp() / budget.period_s)
        self._refund([self._store.settings.key(subject, "dp")], [period, _num(epsilon), _num(1.0 - delta)])


class SharedQuotaLedger:
    """:class:`~nitrovault.access.QuotaLedger`'s ``charge`` over the shared store (module docstring)."""

    def __init__(self, store: StateStore, policies: QuotaTiers, *, clock: Clock = utc_now) -> None:
        self._admission = SharedAdmission(store, policies, clock=clock)

    def charge(self, subject: str, tier: str | None, items: int = 1, *, request: bool = True) -> QuotaState:
        """Charge one call of ``items`` items or raise :class:`QuotaExceededError`
        (:class:`StateStoreError` when the store cannot decide). ``request=False``: the items-only
        "continuation" charge of a streamed call (no bucket token, no daily request), as in memory."""
        quota = self._admission.admit(subject, tier, items, request=request).quota
        if quota is None:  # asked for: the script answers it whenever it admits
            raise StateStoreError("the state store answered a limit script unexpectedly")
        return quota


class SharedPrivacyBudget:
    """:class:`~nitrovault.protection.PrivacyBudget`'s ``spend`` over the shared store."""

    def __init__(self, store: StateStore, policy: BudgetPolicy, *, clock: Clock = utc_now) -> None:
        self._admission = SharedAdmission(store, QuotaTiers({"-": _NO_QUOTA}, default="-"), policy,
                                          clock=clock)

    def spend(self, subject: str, epsilon: float, delta: float = 0.0) -> BudgetState:
        """Spend (ε, δ) for ``subject`` or raise :class:`QuotaExceededError` (``privacy-budget``)."""
        state = self._admission.admit(subject, items=None, privacy=(epsilon, delta)).budget
        if state is None:  # asked for: the script answers it whenever it admits
            raise StateStoreError("the state store answered a limit script unexpectedly")
        return state

    def refund(self, subject: str, epsilon: float, delta: float = 0.0) -> None:
        """Give back a spend whose answer was never released."""
        self._admission.refund(subject, (epsilon, delta))


class SharedAggregates:
    """The extraction monitor's per-subject windows over every enclave and boot: query times (the volume
    signal), near-duplicate flags and coverage cells (one flag and one cell id per query: numbers derived
    in the enclave, never the inputs, which stay in the enclave and so do PRADA's growing sets).

    One script per observed call appends this call's rows and returns the windows, exactly as
    :class:`~nitrovault.protection.ExtractionMonitor` keeps them in memory (the volume window holds at most
    ``volume_max + 1`` times). Keys expire ``idle_s`` after a subject's last query (default: a day, or the
    volume window if longer).
    """

    def __init__(self, store: StateStore, policy: ExtractionPolicy, *, idle_s: float = 86_400.0) -> None:
        self._store = store
        self._policy = policy
        self._ttl_ms = math.ceil(max(idle_s, policy.volume_window_s) * 1000)
        self._script = store.script(_AGGREGATES)

    def record(self, subject: str, now: float, flags: list[bool], cells: list[int] | None) -> Windows:
        p = self._policy
        key = self._store.settings.key
        reply = _reply(self._script(
            [key(subject, "xv"), key(subject, "xd"), key(subject, "xc")],
            [math.floor(now * 1000), math.ceil(p.volume_window_s * 1000), p.volume_max + 1,
             secrets.token_hex(8), p.dup_window, p.coverage_window, self._ttl_ms,
             "".join("1" if f else "0" for f in flags), ",".join(map(str, cells or []))],
        ))
        try:
            volume, shared_flags, shared_cells = int(str(reply[0])), str(reply[1]), reply[2]
            assert isinstance(shared_cells, list)
            cell_ids = tuple(int(c.decode() if isinstance(c, bytes) else c) for c in shared_cells)
        except (IndexError, ValueError, AssertionError):
            raise StateStoreError("the state store answered a limit script unexpectedly") from None
        return Windows(volume, tuple(c == "1" for c in shared_flags), cell_ids)


class SharedRefusals:
    """Extraction blocks and throttles in the shared store: what the monitor decided about a subject holds
    on every enclave and across restarts until it ends."""

    def __init__(self, store: StateStore, *, clock: Clock = utc_now) -> None:
        self._store = store
        self._clock = clock
        self._admission = SharedAdmission(store, QuotaTiers({"-": _NO_QUOTA}, default="-"), clock=clock)
        self._set = store.script(_REFUSE)

    def admit(self, subject: str) -> None:
        """Raise ``PermissionDeniedError("extraction-blocked")`` / ``QuotaExceededError
        ("extraction-throttled")`` while a refusal holds (:class:`StateStoreError` if unknown): the
        admission script's refusal check alone."""
        self._admission.admit(subject, items=None, refusals=True)

    def refuse(self, subject: str, kind: str, seconds: float) -> None:
        """Record a ``block`` or ``throttle`` of ``subject`` for ``seconds`` from now."""
        if kind not in ("block", "throttle") or not seconds > 0:
            raise ValueError("kind must be block or throttle, for a positive time")
        until = self._clock() + timedelta(seconds=seconds)
        self._set([self._store.settings.key(subject, "x")],
                  [kind, _ms(until), math.ceil(seconds * 1000) + 1000])
