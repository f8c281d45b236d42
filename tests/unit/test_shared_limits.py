"""The shared limits against a real redis-server (TLS, RBAC user): the same decisions as the in-memory
ledgers, shared by every client ("enclave") of one namespace, atomic under races, and fail closed.

The in-memory :class:`QuotaLedger` and :class:`PrivacyBudget` are the reference: a random sequence of
charges is replayed against both and every decision (admitted state, or refusal reason and retry time)
must agree.
"""

from __future__ import annotations

import dataclasses
import random
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from fakes import FakeClock
from redis.backoff import NoBackoff
from redis.retry import Retry
from stores import store_for

from nitrovault.access import QuotaLedger, QuotaPolicy, QuotaTiers
from nitrovault.errors import (
    PermissionDeniedError,
    QuotaExceededError,
    StateStoreCredentialError,
    StateStoreError,
)
from nitrovault.local.state_store import USERNAME, LocalStateStore
from nitrovault.protection import BudgetPolicy, ExtractionMonitor, ExtractionPolicy, PrivacyBudget
from nitrovault.state import SharedPrivacyBudget, SharedQuotaLedger, SharedRefusals, StateStore

T0 = datetime(2026, 12, 3, 23, 59, 50, tzinfo=UTC)  # ten seconds before midnight: daily windows roll


def ms(n: int) -> timedelta:
    return timedelta(milliseconds=n)


TIERS = QuotaTiers({"t": QuotaPolicy(rate_per_s=2.0, burst=3, daily_requests=7, daily_items=12),
                    "open": QuotaPolicy(rate_per_s=1000.0, burst=1000)}, default="t")


def _outcome(fn: Any) -> tuple[Any, ...]:
    try:
        state = fn()
    except QuotaExceededError as err:
        return ("refused", err.reason, round(err.retry_after_s, 3))
    return ("ok", *(round(v, 6) if isinstance(v, float) else v for v in vars(state).values()))


def test_quota_decisions_equal_the_in_memory_ledger(store: StateStore) -> None:
    clock = FakeClock(T0)
    memory = QuotaLedger(TIERS, clock=clock)
    shared = SharedQuotaLedger(store, TIERS, clock=clock)
    rng = random.Random(7)  # noqa: S311 - a reproducible workload, not a secret
    refusals = set()
    for _ in range(400):
        clock.advance(ms(rng.choice([0, 0, 1, 50, 250, 700, 3000])))
        subject, items = rng.choice(["a", "b"]), rng.randint(0, 4)
        expected = _outcome(lambda: memory.charge(subject, None, items))  # noqa: B023
        got = _outcome(lambda: shared.charge(subject, None, items))  # noqa: B023
        assert got == expected, (clock.now, subject, items)
        if expected[0] == "refused":
            refusals.add(expected[1])
    assert refusals == {"rate", "daily-requests", "daily-items"}  # every rule was exercised


def test_continuation_charges_decide_as_the_in_memory_ledger(store: StateStore) -> None:
    """Streamed calls: a mix of call charges and items-only continuations (``request=False``)."""
    tiers = QuotaTiers({"s": QuotaPolicy(rate_per_s=2.0, burst=3, daily_requests=40, daily_items=90)},
                       default="s")  # a stream's tokens outnumber its calls
    clock = FakeClock(T0)
    memory = QuotaLedger(tiers, clock=clock)
    shared = SharedQuotaLedger(store, tiers, clock=clock)
    rng = random.Random(11)  # noqa: S311 - a reproducible workload, not a secret
    seen = set()
    for _ in range(600):
        clock.advance(ms(rng.choice([0, 0, 1, 50, 250, 700, 3000])))
        subject, items, request = rng.choice(["c", "d"]), rng.randint(0, 3), rng.random() < 0.4
        expected = _outcome(lambda: memory.charge(subject, None, items, request=request))  # noqa: B023
        got = _outcome(lambda: shared.charge(subject, None, items, request=request))  # noqa: B023
        assert got == expected, (clock.now, subject, items, request)
        if expected[0] == "refused":
            seen.add((request, expected[1]))
        elif not request and expected[3] < 1.0:
            seen.add((request, "admitted-with-an-empty-bucket"))
    assert seen == {(True, "rate"), (True, "daily-requests"), (True, "daily-items"),
                    (False, "daily-items"), (False, "admitted-with-an-empty-bucket")}


def test_a_refused_continuation_writes_nothing(store: StateStore) -> None:
    clock = FakeClock(T0)
    ledger = SharedQuotaLedger(store, TIERS, clock=clock)
    ledger.charge("y", None, 1)
    state = ledger.charge("y", None, 11, request=False)
    assert (state.remaining_requests, state.remaining_items, state.tokens) == (6, 0, 2.0)
    key = store.settings.key("y", "q")
    before = store.client.hgetall(key)
    with pytest.raises(QuotaExceededError) as refused:
        ledger.charge("y", None, 1, request=False)
    assert refused.value.reason == "daily-items"
    assert refused.value.retry_after_s == pytest.approx(10.0)  # T0 is ten seconds before midnight
    assert store.client.hgetall(key) == before


def test_privacy_budget_decisions_equal_the_in_memory_budget(store: StateStore) -> None:
    clock = FakeClock(T0)
    policy = BudgetPolicy(epsilon=1.0, delta=1e-5, period_s=5.0)
    memory = PrivacyBudget(policy, clock=clock)
    shared = SharedPrivacyBudget(store, policy, clock=clock)
    rng = random.Random(3)  # noqa: S311 - a reproducible workload, not a secret
    outcomes = set()
    for _ in range(300):
        clock.advance(ms(rng.choice([0, 10, 400, 2000])))
        subject = rng.choice(["a", "b"])
        eps, delta = rng.choice([0.1, 0.25, 0.3]), rng.choice([0.0, 1e-6, 3e-6])
        expected = _outcome(lambda: memory.spend(subject, eps, delta))  # noqa: B023
        got = _outcome(lambda: shared.spend(subject, eps, delta))  # noqa: B023
        assert got[:2] == expected[:2]
        if got[0] == "ok":
            assert got[1:3] == pytest.approx(expected[1:3], abs=1e-12)  # remaining ε and δ
        outcomes.add(expected[0])
    assert outcomes == {"ok", "refused"}


def test_a_refused_charge_writes_nothing(store: StateStore) -> None:
    clock = FakeClock(T0)
    ledger = SharedQuotaLedger(store, TIERS, clock=clock)
    for _ in range(3):
        ledger.charge("x", None, 1)
    key = store.settings.key("x", "q")
    before = store.client.hgetall(key)
    with pytest.raises(QuotaExceededError):
        ledger.charge("x", None, 1)
    assert store.client.hgetall(key) == before


def test_a_new_client_sees_every_charge_restart_and_fleet(state_store_server: Any, store: StateStore) -> None:
    """A restarted enclave (a new client) and a second enclave (another client at once) share one count."""
    server, port, _ = state_store_server
    clock = FakeClock(T0)
    first = SharedQuotaLedger(store, TIERS, clock=clock)
    for _ in range(3):
        first.charge("shared", None, 1)
    other = store_for(server, port, namespace=store.settings.namespace)
    try:
        second = SharedQuotaLedger(other, TIERS, clock=clock)
        with pytest.raises(QuotaExceededError) as refused:
            second.charge("shared", None, 1)
        assert refused.value.reason == "rate"
        clock.advance(ms(500))  # one token back: exactly one more call on either enclave
        second.charge("shared", None, 1)
        with pytest.raises(QuotaExceededError):
            first.charge("shared", None, 1)
    finally:
        other.close()


def _race(ledgers: list[SharedQuotaLedger], subject: str, attempts: int) -> int:
    """Every ledger's thread tries ``attempts`` charges of ``subject`` at once; how many were admitted."""
    admitted: list[int] = []
    start = threading.Barrier(len(ledgers))

    def race(ledger: SharedQuotaLedger) -> None:
        start.wait()
        for _ in range(attempts):
            try:
                ledger.charge(subject, None, 1)
                admitted.append(1)
            except QuotaExceededError:
                pass

    threads = [threading.Thread(target=race, args=(ledger,)) for ledger in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(admitted)


def test_sixteen_racing_clients_admit_exactly_the_quota(state_store_server: Any, store: StateStore) -> None:
    server, port, _ = state_store_server
    tiers = QuotaTiers({"d": QuotaPolicy(rate_per_s=1000.0, burst=1000, daily_requests=10)}, default="d")
    clients = [store_for(server, port, namespace=store.settings.namespace) for _ in range(16)]
    try:
        assert _race([SharedQuotaLedger(c, tiers) for c in clients], "racer", 3) == 10  # 48 attempts
    finally:
        for c in clients:
            c.close()


def test_refusals_hold_for_a_new_client_and_end_on_time(state_store_server: Any, store: StateStore) -> None:
    server, port, _ = state_store_server
    clock = FakeClock(T0)
    refusals = SharedRefusals(store, clock=clock)
    refusals.refuse("thief", "block", 60)
    refusals.refuse("thief", "throttle", 5)  # a throttle never shortens a block
    refusals.refuse("slow", "throttle", 5)
    other = store_for(server, port, namespace=store.settings.namespace)
    try:
        again = SharedRefusals(other, clock=clock)
        with pytest.raises(PermissionDeniedError) as blocked:
            again.admit("thief")
        assert blocked.value.reason == "extraction-blocked"
        with pytest.raises(QuotaExceededError) as throttled:
            again.admit("slow")
        assert throttled.value.reason == "extraction-throttled"
        assert throttled.value.retry_after_s == pytest.approx(5.0)
        clock.advance(ms(5_001))
        again.admit("slow")
        again.admit("honest")
        with pytest.raises(PermissionDeniedError):
            again.admit("thief")
        clock.advance(ms(55_000))
        again.admit("thief")
    finally:
        other.close()


def test_a_block_decided_by_one_monitor_refuses_on_another(store: StateStore) -> None:
    """Enclave A's monitor blocks a subject; a fresh monitor (enclave B, or A after a restart) refuses it."""
    clock = FakeClock(T0)
    policy = ExtractionPolicy.from_config({"volume_max": 2, "volume_window_s": 60, "block_s": 600,
                                           "actions": {"volume": "block"}})
    first = ExtractionMonitor(policy, clock=clock, refusals=SharedRefusals(store, clock=clock))
    for _ in range(3):
        decision = first.observe("greedy", [[1.0, 2.0]], [0])
    assert decision.error() is not None
    fresh = ExtractionMonitor(policy, clock=clock, refusals=SharedRefusals(store, clock=clock))
    with pytest.raises(PermissionDeniedError):
        fresh.admit("greedy")
    fresh.admit("someone-else")


def test_the_wrong_password_is_a_credential_error(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    client = store_for(server, port, password="not-the-sealed-password")
    with pytest.raises(StateStoreCredentialError):
        client.ping()


def test_an_impostor_store_fails_tls_verification(state_store_server: Any, tmp_path: Any) -> None:
    """A parent that answers the store leg itself (its own redis-server and CA) gets no AUTH from us."""
    server, port, _ = state_store_server
    impostor = LocalStateStore.ensure(tmp_path / "impostor", tmp_path / "pw")
    client = store_for(server, port, ca=impostor.ca_pem)  # we trust only the impostor's CA: must fail
    with pytest.raises(StateStoreError, match="unreachable"):
        client.ping()
    other_name = store_for(server, port, host="not-the-store.example")
    with pytest.raises(StateStoreError, match="unreachable"):
        other_name.ping()


def test_an_unreachable_store_fails_closed(state_store_server: Any) -> None:
    server, _, _ = state_store_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    ledger = SharedQuotaLedger(store_for(server, closed), TIERS)
    with pytest.raises(StateStoreError, match="unreachable"):
        ledger.charge("anyone", None, 1)


def test_nobody_else_gets_in_default_user_plaintext_and_other_commands(state_store_server: Any,
                                                                       store: StateStore) -> None:
    server, port, _ = state_store_server
    ca = server.ca_pem.decode()
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_data=ca, ssl_check_hostname=False,
                    retry=Retry(NoBackoff(), 0)).ping()
    with socket.create_connection(("127.0.0.1", port)) as plain:  # TLS only: plaintext gets no answer
        plain.sendall(b"*1\r\n$4\r\nPING\r\n")
        try:
            answer = plain.recv(64)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # the server dropped the connection without a reply
    for command in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("SET", "other:key", "1")):
        with pytest.raises(StateStoreCredentialError):
            store.call(lambda c=command: store.client.execute_command(*c))  # type: ignore[misc]
    assert USERNAME in server.acl_file.read_text()
    assert server.password not in server.acl_file.read_text()  # the server holds only its hash


def _decisions(monitor: ExtractionMonitor, clock: FakeClock, seed: int) -> list[tuple[Any, ...]]:
    """A workload mixing natural rows, repeats and far-away probes; every decision with its evidence."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seeds = rng.normal(size=(4, 6))
    out = []
    for step in range(120):
        clock.advance(ms(int(rng.choice([0, 10, 900, 4000]))))
        kind = step % 3
        rows = (seeds[rng.integers(0, 4, size=2)] + rng.normal(scale=1e-4, size=(2, 6)) if kind == 0
                else rng.normal(size=(2, 6)) * (8.0 if kind == 1 else 1.0))
        decision = monitor.observe("thief", rows, rng.integers(0, 3, size=2))
        out.append((decision.action, decision.signals, dict(decision.evidence)))
    return out


def test_shared_windows_decide_exactly_as_the_in_memory_monitor(store: StateStore) -> None:
    import numpy as np

    from nitrovault.state import SharedAggregates

    policy = ExtractionPolicy.from_config({"volume_max": 30, "volume_window_s": 20, "dup_window": 16,
                                           "dup_max_fraction": 0.2,
                                           "coverage_window": 40, "coverage_clusters": 8,
                                           "actions": {"prada": "record", "volume": "record",
                                                       "duplicates": "record", "coverage": "record"}})
    reference = np.random.default_rng(0).normal(size=(200, 6))
    clock_a, clock_b = FakeClock(T0), FakeClock(T0)
    memory = ExtractionMonitor(policy, clock=clock_a, reference=reference)
    shared = ExtractionMonitor(policy, clock=clock_b, reference=reference,
                               aggregates=SharedAggregates(store, policy))
    expected, got = _decisions(memory, clock_a, 5), _decisions(shared, clock_b, 5)
    assert got == expected
    fired = {s for _, signals, _ in expected for s in signals}
    assert {"volume", "duplicates", "coverage"} <= fired  # every shared window was exercised


def test_a_thief_spreading_queries_over_two_enclaves_and_a_restart_is_counted_once(
        state_store_server: Any, store: StateStore) -> None:
    from nitrovault.state import SharedAggregates

    server, port, _ = state_store_server
    clock = FakeClock(T0)
    policy = ExtractionPolicy.from_config({"volume_max": 10, "volume_window_s": 3600,
                                           "actions": {"volume": "block"}})
    other = store_for(server, port, namespace=store.settings.namespace)
    try:
        a, b = (ExtractionMonitor(policy, clock=clock, aggregates=SharedAggregates(s, policy),
                                  refusals=SharedRefusals(s, clock=clock)) for s in (store, other))
        for i in range(5):  # 10 queries, half on each enclave: at the limit, not past it
            assert a.observe("spreader", [[float(i), 1.0]], [0]).error() is None
            assert b.observe("spreader", [[float(i), 2.0]], [0]).error() is None
        restarted = ExtractionMonitor(policy, clock=clock, aggregates=SharedAggregates(other, policy),
                                      refusals=SharedRefusals(other, clock=clock))
        decision = restarted.observe("spreader", [[9.0, 9.0]], [0])  # the 11th, on a fresh boot
        assert decision.signals == ("volume",) and decision.evidence["volume_in_window"] == 11
        with pytest.raises(PermissionDeniedError):
            a.admit("spreader")
        alone = ExtractionMonitor(policy, clock=clock)  # without the store: one enclave counts 1
        assert alone.observe("spreader", [[9.0, 9.0]], [0]).evidence["volume_in_window"] == 1
    finally:
        other.close()


def test_one_admission_is_all_or_nothing_over_refusal_quota_and_budget(store: StateStore) -> None:
    from nitrovault.state import SharedAdmission

    clock = FakeClock(T0)
    admission = SharedAdmission(store, TIERS, BudgetPolicy(epsilon=1.0), clock=clock)
    quota_key, budget_key = store.settings.key("s", "q"), store.settings.key("s", "dp")
    first = admission.admit("s", None, 1, privacy=(0.6, 0.0))
    assert first.quota is not None and first.quota.remaining_requests == 6
    assert first.budget is not None and first.budget.remaining_epsilon == pytest.approx(0.4)
    before = (store.client.hgetall(quota_key), store.client.hgetall(budget_key))
    with pytest.raises(QuotaExceededError) as refused:  # the budget refuses: the quota is not charged
        admission.admit("s", None, 1, privacy=(0.6, 0.0))
    assert refused.value.reason == "privacy-budget"
    assert (store.client.hgetall(quota_key), store.client.hgetall(budget_key)) == before
    soft = admission.admit("s", None, 1, privacy=(0.6, 0.0), soft=True)  # quota charged, nothing spent
    assert soft.budget_refused and soft.budget is None and soft.quota is not None
    assert soft.quota.remaining_requests == 5
    assert store.client.hgetall(budget_key) == before[1]
    SharedRefusals(store, clock=clock).refuse("s", "block", 60)
    charged = store.client.hgetall(quota_key)
    with pytest.raises(PermissionDeniedError):  # a block is checked first: nothing is charged
        admission.admit("s", None, 1, privacy=(0.1, 0.0), refusals=True)
    assert store.client.hgetall(quota_key) == charged


def test_a_refund_gives_back_exactly_the_spend(store: StateStore) -> None:
    from nitrovault.state import SharedAdmission

    clock = FakeClock(T0)
    admission = SharedAdmission(store, TIERS, BudgetPolicy(epsilon=1.0, delta=1e-5), clock=clock)
    admission.admit("r", items=None, privacy=(0.25, 2e-6))
    spent = admission.admit("r", items=None, privacy=(0.5, 3e-6)).budget
    admission.refund("r", (0.5, 3e-6))  # that answer was never released
    after = admission.admit("r", items=None, privacy=(0.0, 0.0)).budget
    assert spent is not None and after is not None
    assert after.remaining_epsilon == pytest.approx(0.75)
    assert after.remaining_delta == pytest.approx(1e-5 - 2e-6, abs=1e-15)


def test_many_threads_on_one_client_batch_and_still_admit_exactly_the_quota(store: StateStore) -> None:
    """One enclave (one client, its calls sent in pipelined batches when they overlap): 32 threads race."""
    tiers = QuotaTiers({"d": QuotaPolicy(rate_per_s=1000.0, burst=1000, daily_requests=50)}, default="d")
    ledger = SharedQuotaLedger(store, tiers)
    assert _race([ledger] * 32, "batched", 4) == 50  # 128 attempts, batched or not: exactly the quota


def test_scripts_flushed_from_the_store_are_loaded_again(store: StateStore) -> None:
    """A failover or restart empties the store's script cache: the next call reloads, nothing is lost."""
    ledger = SharedQuotaLedger(store, TIERS, clock=FakeClock(T0))
    ledger.charge("f", None, 1)
    store.client.script_flush()
    assert ledger.charge("f", None, 1).remaining_requests == 5  # ran once: the first run counted too


def test_a_stalled_store_answers_every_waiting_caller_with_an_error(state_store_server: Any) -> None:
    """SIGSTOP the server: the call in flight and the calls queued behind it all fail, none hangs, and the
    client serves again once the server answers."""
    import os
    import signal

    server, port, proc = state_store_server
    client = store_for(server, port)
    client = StateStore.connect(dataclasses.replace(client.settings, timeout_s=0.2), server.password,
                                route=lambda: socket.create_connection(("127.0.0.1", port), 0.2))
    ledger = SharedQuotaLedger(client, TIERS)
    ledger.charge("stalled", None, 0)  # connected and scripts loaded
    errors: list[BaseException] = []

    def call() -> None:
        try:
            ledger.charge("stalled", None, 0)
        except StateStoreError as err:
            errors.append(err)

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert len(errors) == 8 and all("unreachable" in str(e) for e in errors)
    assert ledger.charge("stalled", None, 0).remaining_requests is not None
    client.close()
