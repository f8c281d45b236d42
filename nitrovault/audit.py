"""The audit log: a hash chain of call records, signed by the enclave's boot key at checkpoints.

The enclave writes (:class:`AuditWriter`), the untrusted parent stores (a sink, e.g.
:class:`RotatingFileSink`), anyone holding the enclave's attestation document verifies
(:func:`verify_audit`). The parent can drop, edit, reorder or insert lines; it cannot do so without
:func:`verify_audit` failing.

Format: JSON lines, one entry per line, each the canonical JSON (keys sorted, no spaces, UTF-8, integers
only: floats are refused so every implementation hashes the same bytes) of::

    {"v": 1, "kind": "record" | "checkpoint" | "gap", "boot": <hex, 16 bytes, per writer>,
     "seq": <0, 1, 2, ... per boot, no holes>, "t": <Unix ms>,
     "prev": <hash of entry seq-1; 64 zeros at seq 0>,
     "body": {...}, "hash": <hex SHA-256>, "sig": <hex Ed25519, checkpoint and gap entries only>}

    hash = SHA-256(b"nitrovault-audit-v1\\x00" || canonical(entry without "hash" and "sig"))
    sig  = Ed25519(boot key, b"nitrovault-audit-sig-v1\\x00" || hash bytes)

* ``record`` bodies are what the server logs (subject, method, model, decision, quota state, latency,
  receipt id). They never hold raw inputs or outputs: keys named ``input``, ``output``, ``text``,
  ``texts`` or ``tensor`` (at any depth) are refused with :class:`~nitrovault.errors.AuditError`.
* ``checkpoint`` bodies are ``{"kid": key id, "final": bool}``; one is written after every
  ``checkpoint_every`` records and a final one on :meth:`AuditWriter.close`. Its signature covers its
  hash, hence (through ``prev``) the whole chain up to it: head hash and sequence number.
* ``gap`` bodies are ``{"kid", "dropped": n, "from_t", "to_t"}``: signed, chained like any entry.

Audit position: :meth:`AuditWriter.position` is the :class:`AuditPosition` ``(seq, head)`` the next
chained entry extends (``seq`` it will get, ``head`` the hash of entry ``seq - 1``, :data:`GENESIS` at
seq 0). The server takes it before appending a call's record and signs it into that call's receipt
(:meth:`nitrovault.receipts.ReceiptSigner.sign` ``audit=``, receipt body v2 ``aseq``/``ahead``). A
receipt therefore proves, to whoever holds it, that entries ``0 .. aseq-1`` exist with that head, and
that the call's record (or a signed gap entry reporting it lost) comes at ``seq >= aseq``: the parent
can no longer cut the log at a checkpoint and pass it off as complete.

Sink failure (the parent's audit sink is down): serving continues. Entries already chained wait in a
buffer of ``max_buffered`` records (plus the checkpoint, gap and final entries they lead to) and are
retried in order on every append and :meth:`AuditWriter.flush`.
When the buffer is full, new records are **not chained** but counted (``append`` returns ``None``);
as soon as the buffer has drained, a signed ``gap`` entry records how many were lost and when. The chain
therefore never has a hole: the verifier sees exactly how many records were lost, in which window.
:attr:`AuditWriter.status` reports ``degraded`` for health checks and metrics.

Verification rules (:func:`verify_audit`, files in rotation order; each boot's log verifies against that
boot's attestation document). The first line that breaks a rule is reported as ``(file, line, reason)``:

1. every line is one well-formed entry (a torn last line is ``malformed``);
2. its ``hash`` matches its content (an edited line fails here: ``modified``);
3. all entries carry the same ``boot``;
4. ``seq`` is exactly one more than the previous entry's (a deleted record, or a missing rotated file,
   fails at the next line; a reordered one where it lands; a repeated seq names the first copy);
5. ``prev`` is the previous entry's hash (an inserted or replaced record fails here);
6. every checkpoint and gap signature verifies under the key bound in the attestation document's
   ``user_data`` (:func:`nitrovault.receipts.enclave_user_data`); a chain rewritten with recomputed
   hashes fails here, at the first checkpoint after the rewrite;
7. truncation: the log must end with the ``final`` checkpoint, with nothing after it. A log cut anywhere
   (including a missing last file, or records after the last checkpoint that no signature covers) fails.
   A running enclave's log has no final checkpoint yet: ``live=True`` accepts that, counts the records
   after the last checkpoint as ``uncovered`` (not verified) and requires the log to begin at seq 0.
   An enclave that crashed also leaves no final checkpoint: strict verification cannot tell that from
   truncation, and says so (unless receipts prove entries past the end: ``cut``, rule 8).
8. receipts (``receipts=``: each a :meth:`~nitrovault.receipts.Receipt.to_bytes`, as clients save them):
   each must verify under the same document's key and PCR0 (steps 1, 4-6 of
   :func:`nitrovault.receipts.verify_receipt`; a receipt that does not is reported with that step's
   reason, e.g. ``other-key`` for another boot's, never raised). Then, for a v2 receipt with
   ``aseq = N``, ``ahead = H`` and receipt id ``R``:

   a. if ``N > 0`` the log must hold entry ``N - 1`` and its hash must be ``H``: ``withheld`` when the
      log ends before ``N - 1``, ``forked`` when entry ``N - 1`` has another hash (a rewritten chain,
      even in an open tail no checkpoint covers yet);
   b. a record whose body's ``receipt`` is ``R`` must be at ``seq >= N``, else ``missing``, unless a
      signed gap entry at ``seq >= N`` reports enough lost records (each gap's ``dropped`` count is
      shared among the receipts it may cover): then the receipt is counted ``in gap``, not a failure.

   A v1 receipt carries no position: only (b), with ``N = 0``. The highest ``N - 1`` over the receipts
   is the seq they prove exists; if the log ends before it the report fails with ``cut`` (receipts
   prove entries up to seq X, the log ends at Y), in strict **and** live mode: a log cut at a
   checkpoint passes ``live=True`` on its own, not against a receipt issued after the cut. A receipt
   issued moments ago may name a record that is still in flight (or buffered while the sink is down):
   verify again once it has been written. Any receipt finding other than ``in gap`` makes the report
   fail. ``first_bad`` is the log's own first bad line as before; ``cut`` takes the place of
   ``truncated`` (or of no failure at all), as ``(last file, 0, "cut: ...")``.

Example::

    writer = AuditWriter(boot_key, sink=RotatingFileSink(Path("audit"), 10 << 20))
    writer.append({"subject": "alice", "method": "Embed", "decision": "ok", "latency_us": 812})
    writer.close()
    report = verify_audit(sorted(Path("audit").glob("*.jsonl")), attestation_doc=doc, root=None, at=t,
                          receipts=[Path("receipt.cbor").read_bytes()])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from nitrovault.attestation import verify_document
from nitrovault.clock import Clock, utc_now
from nitrovault.errors import AttestationError, AuditError, ConfigError, ReceiptError
from nitrovault.receipts import (
    AUDIT_GENESIS,
    AuditPosition,
    Receipt,
    check_receipt,
    key_id,
    public_key_from_user_data,
)

__all__ = [
    "FORBIDDEN_KEYS",
    "AuditEntry",
    "AuditPosition",
    "AuditReport",
    "AuditStatus",
    "AuditWriter",
    "BadRecord",
    "ReceiptFinding",
    "RotatingFileSink",
    "canonical_json",
    "verify_audit",
]

log = logging.getLogger(__name__)

Sink = Callable[[bytes], None]

VERSION = 1
GENESIS = AUDIT_GENESIS  #: "0" * 64: ``prev`` of the entry at seq 0
FORBIDDEN_KEYS = frozenset({"input", "output", "text", "texts", "tensor"})
_HASH_CONTEXT = b"nitrovault-audit-v1\x00"
_SIG_CONTEXT = b"nitrovault-audit-sig-v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KINDS = ("record", "checkpoint", "gap")
_MAX_LINE = 64 * 1024



def _ms(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(milliseconds=1)


def canonical_json(value: Any) -> bytes:
    """Keys sorted, no whitespace, UTF-8, no floats/NaN: the bytes that are hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _entry_hash(entry: Mapping[str, Any]) -> str:
    unsigned = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha256(_HASH_CONTEXT + canonical_json(unsigned)).hexdigest()


def _check_record(value: Any, path: tuple[str | int, ...] = ()) -> None:
    """Refuse raw inputs/outputs (by key name, at any depth) and values canonical JSON cannot pin down.

    On the request path: scalars return at once and the error path is only rendered on failure.
    """
    kind = type(value)
    if kind is str or kind is int or value is None:
        return
    if kind is dict or isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"{_render(path)}: keys must be strings")
            if key.lower() in FORBIDDEN_KEYS:
                raise AuditError(f"{_render((*path, key))}: audit records never hold raw inputs or outputs")
            _check_record(item, (*path, key))
    elif kind is list or kind is tuple:
        for index, item in enumerate(value):
            _check_record(item, (*path, index))
    elif isinstance(value, float):
        raise AuditError(f"{_render(path)}: floats are not allowed (use integers, e.g. latency_us)")
    elif not isinstance(value, str | int):
        raise AuditError(f"{_render(path)}: {type(value).__name__} is not a JSON value")


def _render(path: tuple[str | int, ...]) -> str:
    return "record" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


# -- writer --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    """One chained entry as handed to the sink."""

    seq: int
    kind: str
    hash: str
    line: bytes  #: the JSON line, with its trailing newline
    written: bool  #: False while it waits in the buffer (sink down)


@dataclass(frozen=True)
class AuditStatus:
    degraded: bool  #: entries are waiting or records were lost since the last gap entry
    buffered: int  #: chained entries waiting for the sink
    dropped_pending: int  #: records lost and not yet reported in a gap entry
    dropped_total: int  #: records lost since boot
    next_seq: int


class AuditWriter:
    """Chains, checkpoints and streams audit entries (module docstring). Thread-safe."""

    def __init__(self, signing_key: ed25519.Ed25519PrivateKey, *, sink: Sink, checkpoint_every: int = 100,
                 clock: Clock = utc_now, max_buffered: int = 10_000, boot_id: str | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        if checkpoint_every < 1 or max_buffered < 1:
            raise ConfigError("checkpoint_every and max_buffered must be at least 1")
        self._key = signing_key
        self._kid = key_id(signing_key.public_key())
        self._sink = sink
        self._every = checkpoint_every
        self._clock = clock
        self._max_buffered = max_buffered
        self._boot = boot_id or rng(16).hex()
        if not re.fullmatch(r"[0-9a-f]{8,64}", self._boot):
            raise ConfigError("boot_id must be 8 to 64 lowercase hex digits")
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._buffer: deque[AuditEntry] = deque()
        self._dropped = 0
        self._dropped_total = 0
        self._drop_window: tuple[int, int] | None = None
        self._closed = False
        self._sink_down = False
        self._lock = threading.Lock()

    @property
    def boot_id(self) -> str:
        return self._boot

    @property
    def degraded(self) -> bool:
        return self.status.degraded

    @property
    def status(self) -> AuditStatus:
        with self._lock:
            return AuditStatus(
                degraded=bool(self._buffer) or self._dropped > 0, buffered=len(self._buffer),
                dropped_pending=self._dropped, dropped_total=self._dropped_total, next_seq=self._seq,
            )

    def unacknowledged(self, queued: Callable[[], int]) -> int:
        """Entries not yet stored: this writer's buffered ones, the records lost since the last gap entry,
        and ``queued()`` (the sink's own queue), counted in one snapshot under this writer's lock, which
        every hand-over to the sink holds too (so an entry in transit is counted once, never zero times)."""
        with self._lock:
            return len(self._buffer) + self._dropped + queued()

    def position(self) -> AuditPosition:
        """Where the chain stands now: the seq the next chained entry gets and the hash of the last one
        (``GENESIS`` at seq 0). Take it before appending a call's record and sign it into the call's
        receipt; that record is then chained at ``seq >= position().seq`` (or reported lost in a gap)."""
        with self._lock:
            return AuditPosition(self._seq, self._head)

    def append(self, record: Mapping[str, Any]) -> AuditEntry | None:
        """Chain ``record`` and hand it to the sink. ``None``: the buffer is full and the record was
        counted as lost (a signed gap entry will report it). Raises ``AuditError`` for forbidden content."""
        _check_record(record)
        body = canonical_json(record)  # serialized now: later changes to ``record`` cannot leak in
        with self._lock:
            if self._closed:
                raise AuditError("the audit writer is closed")
            self._drain()
            if len(self._buffer) >= self._max_buffered:
                now = _ms(self._clock())
                self._dropped += 1
                self._dropped_total += 1
                self._drop_window = (self._drop_window[0] if self._drop_window else now, now)
                return None
            entry = self._chain("record", body)
            self._since_checkpoint += 1
            if self._since_checkpoint >= self._every:
                self._chain("checkpoint", canonical_json({"kid": self._kid, "final": False}))
            self._drain()
            return self._current(entry)

    def flush(self) -> AuditStatus:
        """Retry the sink for buffered entries (call it periodically while degraded)."""
        with self._lock:
            self._drain()
        return self.status

    def close(self) -> AuditStatus:
        """Write the final checkpoint (after a gap entry if records were lost) and flush."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._drain()
                if self._dropped:
                    self._chain_gap()
                self._chain("checkpoint", canonical_json({"kid": self._kid, "final": True}))
                self._drain()
        return self.status

    # -- internals (lock held) ---------------------------------------------------------------------------

    def _chain(self, kind: str, body: bytes) -> AuditEntry:
        # Hand-spliced canonical JSON (keys in sorted order; ``body`` is already canonical; every other
        # value is ASCII hex, a fixed word or an integer, so nothing needs escaping). This is the per-call
        # hot path; test_audit checks it equals canonical_json() of the parsed entry.
        unsigned = b"".join((
            b'{"body":', body, b',"boot":"', self._boot.encode(), b'","kind":"', kind.encode(),
            b'","prev":"', self._head.encode(), b'","seq":', str(self._seq).encode(),
            b',"t":', str(_ms(self._clock())).encode(), b',"v":', str(VERSION).encode(), b"}",
        ))
        digest = hashlib.sha256(_HASH_CONTEXT + unsigned).hexdigest()
        tail = b',"hash":"' + digest.encode() + b'"'
        if kind != "record":
            tail += b',"sig":"' + self._key.sign(_SIG_CONTEXT + bytes.fromhex(digest)).hex().encode() + b'"'
            self._since_checkpoint = 0
        line = unsigned[:-1] + tail + b"}\n"  # the line itself need not be canonical: only what is hashed
        chained = AuditEntry(self._seq, kind, digest, line, written=False)
        self._seq += 1
        self._head = digest
        self._buffer.append(chained)
        return chained

    def _chain_gap(self) -> None:
        start, end = self._drop_window or (0, 0)
        self._chain("gap", canonical_json(
            {"kid": self._kid, "dropped": self._dropped, "from_t": start, "to_t": end}))
        self._dropped = 0
        self._drop_window = None

    def _drain(self) -> None:
        while self._buffer:
            entry = self._buffer[0]
            try:
                self._sink(entry.line)
            except Exception as exc:  # the sink is the parent's I/O: any failure means "not written"
                if not self._sink_down:
                    log.warning("audit sink failed (%s): buffering up to %d entries", type(exc).__name__,
                                self._max_buffered)
                    self._sink_down = True
                return
            if self._sink_down:
                log.warning("audit sink recovered; %d entries to write, %d records lost",
                            len(self._buffer), self._dropped)
                self._sink_down = False
            self._buffer.popleft()
            if not self._buffer and self._dropped:
                self._chain_gap()

    def _current(self, entry: AuditEntry) -> AuditEntry:
        written = all(e.seq != entry.seq for e in self._buffer)
        return AuditEntry(entry.seq, entry.kind, entry.hash, entry.line, written=written)


# -- file sink (parent side) ---------------------------------------------------------------------------------


class RotatingFileSink:
    """Appends lines to ``DIR/<prefix>-NNNNNN.jsonl``, starting a new file past ``max_bytes``.

    Each instance starts a new file (never appends to an older boot's). Zero-padded numbers make
    ``sorted(glob)`` the rotation order. Each line goes out in one ``write`` on an ``O_APPEND`` fd.
    """

    def __init__(self, directory: Path | str, max_bytes: int, *, prefix: str = "audit") -> None:
        if max_bytes < 1:
            raise ConfigError("max_bytes must be positive")
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max = max_bytes
        self._prefix = prefix
        existing = [int(p.stem.rsplit("-", 1)[1]) for p in self._dir.glob(f"{prefix}-*.jsonl")
                    if p.stem.rsplit("-", 1)[1].isdigit()]
        self._index = max(existing, default=0)
        self._fd: int | None = None
        self._size = 0
        self.files: list[Path] = []
        self._lock = threading.Lock()

    def _open_next(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._index += 1
        path = self._dir / f"{self._prefix}-{self._index:06d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = 0
        self.files.append(path)

    def __call__(self, line: bytes) -> None:
        with self._lock:
            if self._fd is None or (self._size and self._size + len(line) > self._max):
                self._open_next()
            assert self._fd is not None  # set by _open_next
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._size += len(line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# -- verifier ------------------------------------------------------------------------------------------------


class BadRecord(NamedTuple):
    file: Path
    line: int  #: 1-based; 0 when the failure is not about one line (attestation, empty log)
    reason: str


@dataclass(frozen=True)
class ReceiptFinding:
    """A receipt the log does not account for (rule 8)."""

    receipt_id: str | None  #: ``<kid>:<seq>``; None when the receipt does not even decode
    #: ``withheld``, ``forked``, ``missing``, or the receipt's own failure (:class:`ReceiptError` reason:
    #: ``other-key``, ``signature``, ``pcr0``, ``malformed``)
    reason: str
    detail: str
    audit_seq: int | None = None  #: the receipt's ``aseq`` (None: v1 or undecodable)


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    records: int  #: call records verified (covered by a valid checkpoint signature)
    first_bad: BadRecord | None
    checkpoints: int = 0
    dropped: int = 0  #: records the enclave reported lost in signed gap entries
    uncovered: int = 0  #: live mode: records after the last checkpoint, not (yet) verified
    boot_id: str | None = None
    last_seq: int | None = None  #: seq of the log's last entry read (before ``first_bad``, if any)
    receipts_checked: int = 0  #: distinct receipts given
    receipts_missing: list[ReceiptFinding] = field(default_factory=list)  #: any of these fails the report
    receipts_in_gaps: int = 0  #: receipts whose record a signed gap entry reports lost (not a failure)
    receipts_proven_seq: int | None = None  #: highest seq the (valid v2) receipts prove exists
    cut: bool = False  #: receipts prove entries beyond ``last_seq`` of a log that verifies up to there


class _Bad(Exception):
    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _reject_float(text: str) -> Any:
    raise ValueError("floats are not used in audit entries")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _parse(raw: bytes) -> dict[str, Any]:
    if not raw.endswith(b"\n"):
        raise ValueError("torn line (no newline)")
    entry = json.loads(raw.decode("utf-8"), parse_float=_reject_float, parse_constant=_reject_float,
                       object_pairs_hook=_no_duplicates)
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    expected = {"v", "kind", "boot", "seq", "t", "prev", "body", "hash"}
    kind = entry.get("kind")
    if kind not in _KINDS:
        raise ValueError("unknown kind")
    if set(entry) != (expected if kind == "record" else expected | {"sig"}):
        raise ValueError("missing or unknown fields")
    if entry["v"] != VERSION:
        raise ValueError("unsupported version")
    for name in ("seq", "t"):
        if isinstance(entry[name], bool) or not isinstance(entry[name], int) or entry[name] < 0:
            raise ValueError(f"bad {name}")
    for name in ("boot", "prev", "hash"):
        if not isinstance(entry[name], str):
            raise ValueError(f"bad {name}")
    if not isinstance(entry["body"], dict):
        raise ValueError("bad body")
    if kind != "record" and (not isinstance(entry["sig"], str)
                             or not isinstance(entry["body"].get("kid"), str)):
        raise ValueError("bad signature fields")
    return entry


class _Chain:
    """The verifier's running state over all files."""

    def __init__(self, public_key: ed25519.Ed25519PublicKey, receipts: Sequence[Receipt] = (),
                 invalid: Sequence[ReceiptFinding] = ()) -> None:
        self.key = public_key
        self.kid = key_id(public_key)
        self.receipts = list(receipts)  # verified receipts (rule 8)
        self.invalid = list(invalid)  # receipts that did not verify
        self.watch_seqs = {r.audit_seq - 1 for r in receipts if r.audit_seq}  # heads to compare
        self.watch_ids = {r.receipt_id for r in receipts}
        self.heads: dict[int, str] = {}  # seq -> hash, for watch_seqs only
        self.found: dict[str, int] = {}  # receipt id -> highest seq of a record naming it
        self.gaps: list[tuple[int, int]] = []  # (seq, dropped) of every gap entry
        self.broken = False  # a line broke rules 1-6: nothing after it was read
        self.boot: str | None = None
        self.head = GENESIS
        self.next_seq = 0
        self.records = 0
        self.pending: list[tuple[Path, int]] = []  # records since the last checkpoint
        self.checkpoints = 0
        self.dropped = 0
        self.final_at: tuple[Path, int] | None = None
        self.last: tuple[Path, int, int, str] | None = None  # file, line, seq, prev

    def feed(self, file: Path, lineno: int, raw: bytes) -> None:
        try:
            entry = _parse(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Bad(lineno, f"malformed entry: {exc}") from None
        if self.final_at is not None:  # rule 7
            raise _Bad(lineno, "entry after the final checkpoint")
        if _entry_hash(entry) != entry["hash"]:  # rule 2
            raise _Bad(lineno, f"modified: entry seq {entry['seq']} does not match its hash")
        if self.boot is None:
            self.boot = entry["boot"]
        elif entry["boot"] != self.boot:  # rule 3
            raise _Bad(lineno, "entry from another boot (verify each boot's log with its own document)")
        seq = entry["seq"]
        if seq != self.next_seq:  # rule 4
            if self.last is not None and seq == self.last[2] and entry["prev"] == self.last[3]:
                last_file, last_line = self.last[0], self.last[1]
                raise _Bad(last_line if last_file == file else lineno,
                           f"inserted or duplicated entry: seq {seq} appears twice "
                           f"(here and at {file.name}:{lineno})")
            if seq > self.next_seq:
                raise _Bad(lineno, f"missing entries: expected seq {self.next_seq}, found {seq} "
                                   "(deleted or reordered records, or a missing rotated file)")
            raise _Bad(lineno, f"reordered or duplicated entry: expected seq {self.next_seq}, found {seq}")
        if entry["prev"] != self.head:  # rule 5
            raise _Bad(lineno, f"entry seq {seq} does not link to the previous entry (inserted or replaced)")
        if entry["kind"] == "record":
            self.pending.append((file, lineno))
        else:
            self._check_signature(entry, lineno)  # rule 6
            self.records += len(self.pending)
            self.pending.clear()
            if entry["kind"] == "gap":
                dropped = entry["body"].get("dropped")
                if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 1:
                    raise _Bad(lineno, "gap entry without a positive 'dropped' count")
                self.dropped += dropped
                self.gaps.append((seq, dropped))
            else:
                self.checkpoints += 1
                if entry["body"].get("final") is True:
                    self.final_at = (file, lineno)
        if seq in self.watch_seqs:
            self.heads[seq] = entry["hash"]
        receipt_id = entry["body"].get("receipt") if entry["kind"] == "record" else None
        if isinstance(receipt_id, str) and receipt_id in self.watch_ids:
            self.found[receipt_id] = seq  # seqs only go up: the highest
        self.last = (file, lineno, seq, entry["prev"])
        self.head = entry["hash"]
        self.next_seq = seq + 1

    def _check_signature(self, entry: Mapping[str, Any], lineno: int) -> None:
        since = f"records since seq {self.next_seq - len(self.pending)} were rewritten or this entry forged"
        if entry["body"]["kid"] != self.kid:
            raise _Bad(lineno, "checkpoint signed by another key than this enclave's")
        try:
            self.key.verify(bytes.fromhex(entry["sig"]), _SIG_CONTEXT + bytes.fromhex(entry["hash"]))
        except (InvalidSignature, ValueError):
            raise _Bad(lineno, f"{entry['kind']} signature does not verify: {since}") from None


def verify_audit(files: Sequence[Path], *, attestation_doc: bytes, root: x509.Certificate | None,
                 at: datetime, live: bool = False, receipts: Sequence[bytes] = ()) -> AuditReport:
    """Check one boot's audit log, given as its files in rotation order (rules 1-7, module docstring),
    and that it accounts for every receipt given (rule 8)."""
    if not files:
        raise ConfigError("no audit files given")
    first = Path(files[0])
    try:
        verified = verify_document(attestation_doc, at=at, root=root)
        public_key = public_key_from_user_data(verified.document.user_data)
    except (AttestationError, ReceiptError) as err:
        return AuditReport(False, 0, BadRecord(first, 0, f"attestation document: {err}"))
    valid, invalid = _check_receipts(receipts, public_key, verified.document.pcrs.get(0, b""))
    chain = _Chain(public_key, valid, invalid)
    current = first
    try:
        for file in map(Path, files):
            current = file
            with file.open("rb") as fh:
                lineno = 0
                while raw := fh.readline(_MAX_LINE + 1):
                    lineno += 1
                    if len(raw) > _MAX_LINE:
                        raise _Bad(lineno, "line too long")
                    chain.feed(file, lineno, raw)
    except _Bad as bad:
        chain.broken = True
        return _report(chain, BadRecord(current, bad.line, bad.reason))
    if chain.last is None:
        return _report(chain, BadRecord(first, 0, "empty audit log"))
    if chain.final_at is None and not live:
        where = chain.pending[0] if chain.pending else chain.last[:2]
        return _report(chain, BadRecord(where[0], where[1],
                                        f"truncated: no final checkpoint; {len(chain.pending)} records after "
                                        "the last checkpoint are not covered by a signature"))
    return _report(chain, None)


def _check_receipts(receipts: Sequence[bytes], public_key: ed25519.Ed25519PublicKey,
                    pcr0: bytes) -> tuple[list[Receipt], list[ReceiptFinding]]:
    """Rule 8, first part: decode and verify each distinct receipt (steps 1, 4-6); report, never raise."""
    valid: dict[str, Receipt] = {}
    invalid: list[ReceiptFinding] = []
    for data in dict.fromkeys(bytes(r) for r in receipts):
        receipt: Receipt | None = None
        try:
            receipt = Receipt.from_bytes(data)
            check_receipt(receipt, public_key=public_key, pcr0=pcr0)
        except ReceiptError as err:
            invalid.append(ReceiptFinding(None if receipt is None else receipt.receipt_id, err.reason,
                                          f"receipt does not verify against this boot's document: {err}",
                                          None if receipt is None else receipt.audit_seq))
            continue
        valid.setdefault(receipt.receipt_id, receipt)
    return list(valid.values()), invalid


def _receipt_findings(chain: _Chain, last_seq: int | None) -> tuple[list[ReceiptFinding], int]:
    """Rule 8 (a) and (b) over the entries read; returns the findings and how many receipts fell in gaps."""
    ends = f"the log ends at seq {last_seq}" if last_seq is not None else "the log has no entries"
    if chain.broken:
        ends += " (where it stops verifying)"
    findings: dict[str, ReceiptFinding] = {}
    unaccounted: list[Receipt] = []
    for receipt in chain.receipts:
        n = receipt.audit_seq or 0
        if n > 0:
            if last_seq is None or n - 1 > last_seq:  # (a)
                findings[receipt.receipt_id] = ReceiptFinding(
                    receipt.receipt_id, "withheld",
                    f"the receipt proves audit entry seq {n - 1} exists; {ends}", n)
                continue
            if chain.heads.get(n - 1) != receipt.audit_head:
                findings[receipt.receipt_id] = ReceiptFinding(
                    receipt.receipt_id, "forked", f"audit entry seq {n - 1} is not the one the receipt was "
                    "signed after (another hash: the chain was rewritten)", n)
                continue
        if chain.found.get(receipt.receipt_id, -1) < n:  # (b)
            unaccounted.append(receipt)
    # a gap entry at seq >= N may cover the record; each gap's ``dropped`` is shared. The candidate sets
    # are nested (a later N has fewer gaps to choose from), so serving the latest N first is optimal.
    room = [[seq, dropped] for seq, dropped in chain.gaps]
    in_gaps = 0
    for receipt in sorted(unaccounted, key=lambda r: r.audit_seq or 0, reverse=True):
        n = receipt.audit_seq or 0
        slot = next((g for g in room if g[0] >= n and g[1] > 0), None)
        if slot is not None:
            slot[1] -= 1
            in_gaps += 1
            continue
        where = chain.found.get(receipt.receipt_id)
        detail = (f"no record names this receipt at seq >= {n} and no signed gap entry after it reports "
                  "it lost" + (f" (a record at seq {where} names it, before its audit position)"
                               if where is not None else "") + f"; {ends}")
        findings[receipt.receipt_id] = ReceiptFinding(receipt.receipt_id, "missing", detail,
                                                      receipt.audit_seq)
    ordered = [findings[r.receipt_id] for r in chain.receipts if r.receipt_id in findings]
    return [*chain.invalid, *ordered], in_gaps


def _report(chain: _Chain, bad: BadRecord | None) -> AuditReport:
    last_seq = chain.next_seq - 1 if chain.last is not None else None
    proven = max((r.audit_seq - 1 for r in chain.receipts if r.audit_seq), default=None)
    findings, in_gaps = _receipt_findings(chain, last_seq)
    # an empty log or one broken at a line already fails on its own; "cut" is for a log that verifies
    cut = proven is not None and last_seq is not None and proven > last_seq and not chain.broken
    if cut and chain.last is not None:
        # replaces "truncated" too: receipts tell a cut log from a crashed enclave's
        bad = BadRecord(chain.last[0], 0, f"cut: receipts prove audit entries up to seq {proven} exist but "
                                          f"the log ends at seq {last_seq}")
    return AuditReport(ok=bad is None and not findings, records=chain.records, first_bad=bad,
                       checkpoints=chain.checkpoints, dropped=chain.dropped, uncovered=len(chain.pending),
                       boot_id=chain.boot, last_seq=last_seq, receipts_checked=len(chain.receipts)
                       + len(chain.invalid), receipts_missing=findings, receipts_in_gaps=in_gaps,
                       receipts_proven_seq=proven, cut=cut)
