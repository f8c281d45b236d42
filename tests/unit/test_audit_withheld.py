""":meth:`enclave_app.host.AuditShipper.withheld`: the bounds on what the parent may leave unstored (entries
queued here, buffered in the writer or lost and not yet reported in a gap entry) and on how long its
sink may stay down, on a fake clock with a fake ``AuditAppend``; ``on_withheld`` fires once per change.

No sleeps: the tests wait (with generous timeouts) on the shipper's ``on_change`` reports, which come
after it has marked the sink down (and read the clock) or up, and on the fake parent's stored lines. The
shipper's in-process gRPC sink is covered in tests/integration/test_audit_sink.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave_app.host import AuditShipper
from nitrovault.audit import AuditWriter

WAIT_S = 30.0


class Parent:
    """An ``AuditAppend`` that fails on demand and records what it stored."""

    def __init__(self) -> None:
        self.down = False
        self.stored: list[bytes] = []
        self._cond = threading.Condition()

    def send(self, boot_id: str, lines: list[bytes]) -> None:
        if self.down:
            raise ConnectionError("the parent stopped storing")
        with self._cond:
            self.stored.extend(lines)
            self._cond.notify_all()

    def wait_stored(self, kind: str) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: any(f'"kind":"{kind}"'.encode() in line for line in self.stored), WAIT_S)


class Changes:
    """The shipper's ``on_change`` reports, waited on by count."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self._cond = threading.Condition()

    def __call__(self, down: bool, reason: str) -> None:
        with self._cond:
            self.seen.append(down)
            self._cond.notify_all()

    def wait(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.seen) >= count, WAIT_S)


class Rig:
    def __init__(self, *, max_withheld: int, max_withheld_s: float, max_buffered: int = 2,
                 on_withheld: Any = None, monotonic: Any = None) -> None:
        self.parent, self.changes, self.now = Parent(), Changes(), [0.0]
        self.reports: list[str | None] = []
        self.shipper = AuditShipper(
            self.parent.send, retry_s=0.05, linger_s=0, on_change=self.changes,
            monotonic=monotonic or (lambda: self.now[0]), on_withheld=on_withheld or self.reports.append,
            max_withheld=max_withheld, max_withheld_s=max_withheld_s)
        self.writer = AuditWriter(ed25519.Ed25519PrivateKey.generate(), sink=self.shipper,
                                  checkpoint_every=1000, max_buffered=max_buffered)
        self.shipper.start(self.writer)

    def take_the_sink_down(self) -> None:
        """The parent stops storing; returns once the shipper has noticed (and read the clock)."""
        self.parent.down = True
        expected = len(self.changes.seen) + 1
        self.writer.append({"event": "queued-before-the-outage"})
        assert self.changes.wait(expected) and self.changes.seen[-1] is True
        assert self.shipper.down

    def bring_the_sink_back(self) -> None:
        """The parent stores again; returns once everything, the gap entry included, reached it."""
        expected = len(self.changes.seen) + 1
        self.parent.down = False
        assert self.changes.wait(expected) and self.changes.seen[-1] is False


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.shipper.stop()


def _rig(rigs: list[Rig], **kwargs: Any) -> Rig:
    rig = Rig(**kwargs)
    rigs.append(rig)
    return rig


def test_a_healthy_sink_withholds_nothing_and_announces_nothing(rigs: list[Rig]) -> None:
    rig = _rig(rigs, max_withheld=1, max_withheld_s=1)
    assert rig.shipper.withheld() is None
    for i in range(5):
        rig.writer.append({"n": i})
    assert rig.shipper.drain(WAIT_S)
    rig.now[0] = 10**6  # time alone withholds nothing while the sink is up
    assert rig.shipper.withheld() is None
    assert rig.reports == [] and rig.changes.seen == []
    assert len(rig.parent.stored) == 5


def test_a_shipper_without_a_writer_counts_only_its_queue() -> None:
    reports: list[str | None] = []
    shipper = AuditShipper(lambda boot_id, lines: None, max_withheld=1, on_withheld=reports.append)
    assert shipper.withheld() is None  # not started: no writer yet
    shipper(b"a\n")
    assert shipper.withheld() is None  # 1: at the bound
    shipper(b"b\n")
    assert shipper.withheld() == "2 audit entries not stored by the parent (bound 1)"
    assert reports == ["2 audit entries not stored by the parent (bound 1)"]


def test_more_unstored_entries_than_the_bound_count_as_withheld(rigs: list[Rig]) -> None:
    rig = _rig(rigs, max_withheld=3, max_withheld_s=10**6)
    rig.take_the_sink_down()  # 1 unstored: queued in the shipper
    assert rig.shipper.withheld() is None
    rig.writer.append({"n": 1})  # 2: buffered in the writer
    rig.writer.append({"n": 2})  # 3: buffered (the writer's buffer is now full)
    assert rig.shipper.withheld() is None  # exactly the bound: within it
    assert rig.writer.append({"n": 3}) is None  # 4: lost, pending a gap entry
    status = rig.writer.status
    assert (status.buffered, status.dropped_pending) == (2, 1)
    reason = rig.shipper.withheld()
    assert reason == "4 audit entries not stored by the parent (bound 3)"
    assert rig.shipper.withheld() == reason and rig.shipper.withheld() == reason
    assert rig.reports == [reason]  # announced once, not per call
    rig.bring_the_sink_back()
    assert rig.parent.wait_stored("gap")  # the buffer, then the gap entry for the lost record
    assert rig.shipper.drain(WAIT_S)
    assert not rig.writer.degraded
    assert rig.shipper.withheld() is None
    assert rig.shipper.withheld() is None
    assert rig.reports == [reason, None]  # the recovery announced once too
    assert [line.count(b'"kind":"record"') for line in rig.parent.stored] == [1, 1, 1, 0]


def test_a_sink_down_longer_than_the_bound_counts_as_withheld(rigs: list[Rig]) -> None:
    rig = _rig(rigs, max_withheld=10**6, max_withheld_s=60)
    rig.now[0] = 100.0
    rig.take_the_sink_down()  # down since 100 on the fake clock
    rig.now[0] = 160.0
    assert rig.shipper.withheld() is None  # down for exactly the bound: still within it
    rig.now[0] = 160.5
    reason = rig.shipper.withheld()
    assert reason == "audit sink down for more than 60 s"
    rig.now[0] = 500.0
    assert rig.shipper.withheld() == reason
    assert rig.reports == [reason]
    rig.bring_the_sink_back()
    assert rig.shipper.withheld() is None  # back: the clock no longer matters
    assert rig.shipper.withheld() is None
    assert rig.reports == [reason, None]
    rig.take_the_sink_down()  # a second outage starts its own count (down since 500)
    rig.now[0] = 560.0
    assert rig.shipper.withheld() is None
    rig.now[0] = 561.0
    assert rig.shipper.withheld() == reason
    assert rig.reports == [reason, None, reason]


def test_a_failing_announcement_changes_nothing(rigs: list[Rig]) -> None:
    calls: list[str | None] = []

    def on_withheld(reason: str | None) -> None:
        calls.append(reason)
        raise RuntimeError("the console is gone")

    rig = _rig(rigs, max_withheld=10**6, max_withheld_s=1, on_withheld=on_withheld)
    rig.take_the_sink_down()
    rig.now[0] = 2.0
    reason = rig.shipper.withheld()
    assert reason == "audit sink down for more than 1 s"
    assert rig.shipper.withheld() == reason  # still withheld, and not announced again
    rig.bring_the_sink_back()
    assert rig.shipper.withheld() is None
    assert calls == [reason, None]


def test_a_stale_concurrent_call_does_not_announce_a_recovery(rigs: list[Rig]) -> None:
    """Thread A reads the clock (t=30) and is paused there; thread B asks at t=61. Decisions are serialized,
    so B decides after A (whichever starts first) and nobody announces a recovery that did not happen."""
    now = [0.0]
    slow: dict[str, Any] = {}
    read, resume = threading.Event(), threading.Event()

    def monotonic() -> float:
        value = now[0]
        if threading.current_thread() is slow.get("thread"):
            read.set()
            resume.wait(WAIT_S)
        return value

    rig = _rig(rigs, max_withheld=10**6, max_withheld_s=60, monotonic=monotonic)
    rig.take_the_sink_down()
    now[0] = 30.0
    answers: list[str | None] = []
    slow["thread"] = threading.Thread(target=lambda: answers.append(rig.shipper.withheld()))
    slow["thread"].start()
    assert read.wait(WAIT_S)
    now[0] = 61.0
    later: list[str | None] = []
    other = threading.Thread(target=lambda: later.append(rig.shipper.withheld()))
    other.start()  # waits for A's decision to end, or runs after it: the same outcome either way
    resume.set()
    slow["thread"].join()
    other.join()
    assert answers == [None] and later[0] is not None
    assert rig.reports == [later[0]]  # the outage, announced once; no recovery announced
