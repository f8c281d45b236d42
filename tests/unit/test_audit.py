"""Audit log: a parent that edits, drops, reorders, inserts or truncates records is caught at the right
line."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakes import FakeClock

from nitrovault.audit import (
    GENESIS,
    AuditPosition,
    AuditReport,
    AuditWriter,
    RotatingFileSink,
    _entry_hash,
    canonical_json,
    verify_audit,
)
from nitrovault.errors import AuditError
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.receipts import enclave_user_data

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TICK = timedelta(milliseconds=5)
PCRS = {0: bytes(range(48)), 1: b"\x01" * 48, 2: b"\x02" * 48}


def writer_clock() -> FakeClock:
    """A writer's clock: 5 ms later at every reading, starting 5 ms after NOW."""
    return FakeClock(NOW + TICK, tick=TICK)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"), clock=lambda: NOW)


def document(pki: LocalPki, key: ed25519.Ed25519PrivateKey) -> bytes:
    device = LocalNsmDevice(pki, pcrs=PCRS, clock=lambda: NOW)
    return Nsm(device).attestation(user_data=enclave_user_data(key.public_key()))


@pytest.fixture(scope="module")
def boot(pki: LocalPki) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, document(pki, key)


def record(i: int) -> dict[str, Any]:
    return {"subject": f"user{i % 3}", "method": "Embed", "model": "m", "decision": "ok",
            "quota": {"remaining_requests": 100 - i}, "latency_us": 800 + i, "receipt": f"k:{i}"}


def write_log(key: ed25519.Ed25519PrivateKey, n: int = 10, every: int = 4) -> list[bytes]:
    lines: list[bytes] = []
    writer = AuditWriter(key, sink=lines.append, checkpoint_every=every, clock=writer_clock())
    for i in range(n):
        writer.append(record(i))
    writer.close()
    return lines


def check(tmp_path: Path, pki: LocalPki, doc: bytes, *chunks: list[bytes], live: bool = False) -> AuditReport:
    files = []
    for index, chunk in enumerate(chunks):
        path = tmp_path / f"audit-{index:06d}.jsonl"
        path.write_bytes(b"".join(chunk))
        files.append(path)
    return verify_audit(files, attestation_doc=doc, root=pki.root, at=NOW, live=live)


def entry(line: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def rewrite(obj: dict[str, Any], *, rehash: bool) -> bytes:
    if rehash:
        obj["hash"] = _entry_hash(obj)
    return canonical_json(obj) + b"\n"


def bad(report: AuditReport) -> tuple[int, str]:
    assert not report.ok and report.first_bad is not None
    return report.first_bad.line, report.first_bad.reason


# layout with n=10, every=4: lines 1-4 records 0-3, 5 checkpoint, 6-9 records 4-7, 10 checkpoint,
# 11-12 records 8-9, 13 final checkpoint


def test_intact_log(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    assert len(lines) == 13
    kinds = [entry(line)["kind"] for line in lines]
    assert kinds.count("checkpoint") == 3 and entry(lines[-1])["body"]["final"] is True
    report = check(tmp_path, pki, boot[1], lines)
    assert report.ok and report.first_bad is None
    assert (report.records, report.checkpoints, report.dropped) == (10, 3, 0)
    assert all(set(entry(line)) >= {"seq", "prev", "hash", "boot"} for line in lines)


def test_modified_record(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    edited = entry(lines[6])
    edited["body"]["decision"] = "denied"
    lines[6] = rewrite(edited, rehash=False)
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 7 and reason.startswith("modified")


def test_modified_and_rechained_is_caught_by_the_checkpoint(tmp_path: Path, pki: LocalPki,
                                                             boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    head = entry(lines[4])["hash"]  # the checkpoint before the rewrite stays genuine
    for i in range(5, len(lines)):
        obj = entry(lines[i])
        if i == 6:
            obj["body"]["subject"] = "mallory"
        obj["prev"] = head
        lines[i] = rewrite(obj, rehash=True)
        head = obj["hash"]
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 10 and "signature does not verify" in reason and "since seq 5" in reason


def test_deleted_record(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    del lines[6]
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 7 and "missing entries: expected seq 6, found 7" in reason


def test_reordered_records(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    lines[6], lines[7] = lines[7], lines[6]
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 7 and "expected seq 6, found 7" in reason


def test_inserted_record(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    genuine = entry(lines[6])
    forged = {**genuine, "body": {**genuine["body"], "subject": "mallory"}}
    lines.insert(6, rewrite(forged, rehash=True))  # same seq and prev as the genuine one: a fork
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 7 and "inserted or duplicated" in reason


def test_inserted_with_fresh_seq_breaks_the_link(tmp_path: Path, pki: LocalPki,
                                                 boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    forged = entry(lines[6])
    forged["prev"] = "ab" * 32
    lines[6] = rewrite(forged, rehash=True)
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 7 and "does not link" in reason


@pytest.mark.parametrize(("cut", "line"), [(1, 11), (2, 11), (3, 10)])
def test_truncated(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes], cut: int, line: int) -> None:
    lines = write_log(boot[0])[:-cut]
    got_line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert got_line == line and reason.startswith("truncated")


def test_live_mode_accepts_an_open_tail(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])[:-1]
    report = check(tmp_path, pki, boot[1], lines, live=True)
    assert report.ok and report.records == 8 and report.uncovered == 2


def test_entry_after_final(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    lines.append(lines[-2])
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 14 and "after the final" in reason


def test_torn_last_line(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    lines[-1] = lines[-1][:-1]
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 13 and reason.startswith("malformed")


def test_forged_checkpoint_signature(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    obj = entry(lines[4])
    obj["sig"] = "00" * 64
    lines[4] = rewrite(obj, rehash=False)
    line, reason = bad(check(tmp_path, pki, boot[1], lines))
    assert line == 5 and "signature does not verify" in reason


def test_other_enclave_document(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    other = document(pki, ed25519.Ed25519PrivateKey.generate())
    line, reason = bad(check(tmp_path, pki, other, lines))
    assert line == 5 and "another key" in reason


def test_document_that_does_not_verify(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    lines = write_log(boot[0])
    report = verify_audit([tmp_path / "x"], attestation_doc=boot[1][:-5], root=pki.root, at=NOW)
    assert bad(report)[0] == 0 and "attestation document" in bad(report)[1]
    assert lines  # the log itself is fine


def test_entries_from_another_boot(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    first, second = write_log(boot[0]), write_log(boot[0])
    line, reason = bad(check(tmp_path, pki, boot[1], first[:5] + second[5:]))
    assert line == 6 and "another boot" in reason


def test_rotation_across_three_files(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    sink = RotatingFileSink(tmp_path / "audit", max_bytes=1500)
    writer = AuditWriter(boot[0], sink=sink, checkpoint_every=4, clock=writer_clock())
    for i in range(12):
        writer.append(record(i))
    writer.close()
    sink.close()
    files = sorted((tmp_path / "audit").glob("audit-*.jsonl"))
    assert files == sink.files and len(files) >= 3
    assert all(f.stat().st_size <= 1500 for f in files)
    report = verify_audit(files, attestation_doc=boot[1], root=pki.root, at=NOW)
    assert report.ok and report.records == 12

    missing_middle = verify_audit([files[0], *files[2:]], attestation_doc=boot[1], root=pki.root, at=NOW)
    assert not missing_middle.ok and missing_middle.first_bad is not None
    assert missing_middle.first_bad.file == files[2] and missing_middle.first_bad.line == 1
    assert "missing entries" in missing_middle.first_bad.reason

    missing_last = verify_audit(files[:-1], attestation_doc=boot[1], root=pki.root, at=NOW)
    assert not missing_last.ok and "truncated" in bad(missing_last)[1]
    missing_first = verify_audit(files[1:], attestation_doc=boot[1], root=pki.root, at=NOW)
    assert bad(missing_first)[0] == 1 and "expected seq 0" in bad(missing_first)[1]
    swapped = verify_audit([files[1], files[0], *files[2:]], attestation_doc=boot[1], root=pki.root, at=NOW)
    assert not swapped.ok

    # a new sink in the same directory never appends to an older file
    again = RotatingFileSink(tmp_path / "audit", max_bytes=1500)
    again(b"x\n")
    again.close()
    assert again.files[0].name > files[-1].name


class FlakySink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.down = False

    def __call__(self, line: bytes) -> None:
        if self.down:
            raise OSError("parent unreachable")
        self.lines.append(line)


def test_sink_failure_buffers_then_recovers_without_loss(tmp_path: Path, pki: LocalPki,
                                                         boot: tuple[Any, bytes]) -> None:
    sink = FlakySink()
    writer = AuditWriter(boot[0], sink=sink, checkpoint_every=4, clock=writer_clock(), max_buffered=6)
    for i in range(3):
        assert writer.append(record(i)) is not None
    sink.down = True
    outcomes = [writer.append(record(i)) for i in range(3, 20)]
    chained = [e for e in outcomes if e is not None]
    assert all(not e.written for e in chained)
    status = writer.status
    assert status.degraded and status.buffered == 7  # max_buffered records + the checkpoint they triggered
    dropped = outcomes.count(None)
    assert dropped == status.dropped_pending == status.dropped_total and dropped > 0

    sink.down = False
    status = writer.flush()
    assert not status.degraded and status.buffered == 0 and status.dropped_pending == 0
    gap = [entry(line) for line in sink.lines if entry(line)["kind"] == "gap"]
    assert len(gap) == 1 and gap[0]["body"]["dropped"] == dropped
    for i in range(20, 23):
        appended = writer.append(record(i))
        assert appended is not None and appended.written
    writer.close()

    report = check(tmp_path, pki, boot[1], sink.lines)
    assert report.ok and report.dropped == dropped
    assert report.records == 23 - dropped


def test_close_while_sink_down_reports_and_keeps_the_gap(pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    sink = FlakySink()
    writer = AuditWriter(boot[0], sink=sink, checkpoint_every=100, clock=writer_clock(), max_buffered=2)
    sink.down = True
    for i in range(5):
        writer.append(record(i))
    status = writer.close()
    assert status.degraded and status.buffered == 4  # 2 records + gap + final checkpoint
    sink.down = False
    assert not writer.flush().degraded
    assert [entry(line)["kind"] for line in sink.lines] == ["record", "record", "gap", "checkpoint"]
    with pytest.raises(AuditError):
        writer.append(record(9))


@pytest.mark.parametrize("bad_record", [
    {"input": "secret prompt"},
    {"nested": {"Output": [1, 2]}},
    {"items": [{"text": "x"}]},
    {"texts": []},
    {"tensor": None},
    {"latency": 1.5},
    {"blob": b"bytes"},
])
def test_writer_refuses_raw_content(boot: tuple[Any, bytes], bad_record: dict[str, Any]) -> None:
    lines: list[bytes] = []
    writer = AuditWriter(boot[0], sink=lines.append, clock=writer_clock())
    with pytest.raises(AuditError):
        writer.append(bad_record)
    assert lines == [] and writer.status.next_seq == 0


def test_record_is_copied_not_referenced(boot: tuple[Any, bytes]) -> None:
    lines: list[bytes] = []
    writer = AuditWriter(boot[0], sink=lines.append, clock=writer_clock())
    rec: dict[str, Any] = {"subject": "a", "tags": ["x"]}
    writer.append(rec)
    rec["tags"].append("y")
    assert entry(lines[0])["body"] == {"subject": "a", "tags": ["x"]}


def make_writer_factory(key: ed25519.Ed25519PrivateKey) -> Callable[[], AuditWriter]:
    return lambda: AuditWriter(key, sink=lambda _b: None, clock=writer_clock())


def test_boot_ids_differ(boot: tuple[Any, bytes]) -> None:
    make = make_writer_factory(boot[0])
    assert make().boot_id != make().boot_id


def test_hot_path_splicing_matches_canonical_json(boot: tuple[Any, bytes]) -> None:
    import hashlib

    lines = write_log(boot[0], n=5, every=2)
    for line in lines:
        obj = entry(line)
        unsigned = {k: v for k, v in obj.items() if k not in ("hash", "sig")}
        expected = hashlib.sha256(b"nitrovault-audit-v1\x00" + canonical_json(unsigned)).hexdigest()
        assert obj["hash"] == expected == _entry_hash(obj)
    unicode_lines: list[bytes] = []
    writer = AuditWriter(boot[0], sink=unicode_lines.append, clock=writer_clock())
    writer.append({"subject": 'Zoë "quoted" \\ \u2028', "n": -3, "nested": {"b": [True, None], "a": 1}})
    obj = entry(unicode_lines[0])
    assert obj["hash"] == _entry_hash(obj)
    assert obj["body"]["subject"] == 'Zoë "quoted" \\ \u2028'


def test_boot_id_must_be_hex(boot: tuple[Any, bytes]) -> None:
    from nitrovault.errors import ConfigError

    with pytest.raises(ConfigError):
        AuditWriter(boot[0], sink=lambda _b: None, boot_id='x","kind":"checkpoint')
    assert AuditWriter(boot[0], sink=lambda _b: None, boot_id="ab" * 8).boot_id == "ab" * 8


def test_position_tracks_the_chain_head(boot: tuple[Any, bytes]) -> None:
    sink = FlakySink()
    writer = AuditWriter(boot[0], sink=sink, checkpoint_every=2, clock=writer_clock(), max_buffered=2)
    assert writer.position() == AuditPosition(0, GENESIS)
    first = writer.append(record(0))
    assert first is not None and writer.position() == AuditPosition(1, first.hash)
    writer.append(record(1))  # seq 1, then the checkpoint at seq 2: the position is past both
    assert writer.position() == AuditPosition(3, entry(sink.lines[-1])["hash"])
    assert entry(sink.lines[-1])["kind"] == "checkpoint"
    sink.down = True
    writer.append(record(2))
    writer.append(record(3))  # seq 3, 4 + checkpoint 5 buffered; the buffer is now full
    before = writer.position()
    assert writer.append(record(4)) is None  # lost: not chained, the position does not move
    assert writer.position() == before and before.seq == writer.status.next_seq == 6
    sink.down = False
    writer.flush()  # drains, then chains the gap entry
    gap = entry(sink.lines[-1])
    assert gap["kind"] == "gap" and writer.position() == AuditPosition(gap["seq"] + 1, gap["hash"])


def test_position_is_consistent_under_threads(boot: tuple[Any, bytes]) -> None:
    import threading

    lines: list[bytes] = []
    writer = AuditWriter(boot[0], sink=lines.append, checkpoint_every=7, clock=writer_clock())
    seen: list[AuditPosition] = []

    def work(t: int) -> None:
        for i in range(50):
            seen.append(writer.position())
            writer.append(record(t * 100 + i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hashes = {entry(line)["seq"]: entry(line)["hash"] for line in lines}
    assert writer.position() == AuditPosition(len(lines), hashes[len(lines) - 1])
    for position in seen:  # every position ever handed out names a real (seq, head) pair of the chain
        assert position.head == (GENESIS if position.seq == 0 else hashes[position.seq - 1])
