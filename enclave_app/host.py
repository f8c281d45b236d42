"""The enclave's client of the parent's host services (credentials, sealed model, status reports, audit sink).

Nothing the parent returns is trusted for more than it is: credentials only let KMS evaluate the key
policy (which demands our attestation anyway); the sealed model is ciphertext that must authenticate under
the released key. The sealed model (ciphertext) is received into the run directory, which is RAM in an
enclave (it has no disk), bounded by the measured config's ``max_model_bytes``, with offsets and sizes
checked chunk by chunk; a partial download is removed.

:class:`AuditShipper` is the audit writer's sink: it never blocks a request. ``__call__`` only appends
to a bounded in-memory queue (or raises at once while the parent's sink is down, so the
:class:`~nitrovault.audit.AuditWriter` keeps the entries in its own bounded buffer and, past it, counts
losses for a signed gap entry). A background thread sends the queue in order, in batches (lingering up
to ``linger_s`` for a batch to fill), with ``AuditAppend``; a failed batch stays at the head of the
queue and is retried, so lines reach the parent in chain order, each at least once... and exactly once
unless the parent answered an error after storing a batch (a repeated entry is then reported by
``nitrovault audit verify``). Degradation is reported (log line, a ``DEGRADED`` status report) when the
sink goes down and ``SERVING`` when it is back.

The audit log cannot be withheld for long: :meth:`AuditShipper.withheld` says why it counts as withheld
once more than ``max_withheld`` entries are unacknowledged by the parent (queued here, buffered in the
writer, or lost and not yet reported in a gap entry) or the sink has been down for more than
``max_withheld_s`` seconds; the server then refuses protected calls (UNAVAILABLE, ``audit-withheld``)
until the parent has stored everything again. Each change is announced once (``on_withheld``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import grpc

from enclave_app.boot import BootFailure
from nitrovault.audit import AuditWriter
from nitrovault.kms import AwsCredentials
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class HostClient:
    def __init__(
        self, target: str, *, download_dir: Path, max_model_bytes: int, timeout: float = 30.0,
        enclave_cid: int = 0,
    ) -> None:
        #: this enclave's vsock CID, in every report (the parent tells its enclaves apart by it)
        self.enclave_cid = enclave_cid
        self._download_dir = download_dir
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 8 << 20)])
        self._stub = pb_grpc.HostServicesStub(self._channel)
        self._max = max_model_bytes
        self._timeout = timeout
        self._control_lock = threading.Lock()
        self._control: Any = None

    def credentials(self) -> AwsCredentials:
        try:
            creds = self._stub.GetCredentials(pb.CredentialsRequest(), timeout=self._timeout)
        except grpc.RpcError as err:
            raise BootFailure("credentials", f"host services unavailable ({err.code().name})") from None
        if not creds.access_key_id or not creds.secret_access_key:
            raise BootFailure("credentials", "parent returned no credentials")
        return AwsCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token or None)

    def sealed_model(self, model_id: str) -> Path:
        path = self._download_dir / "model.sealed"
        try:
            with path.open("wb") as out:
                os.chmod(path, 0o600)
                self._download(model_id, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return path

    def _download(self, model_id: str, out: object) -> None:
        write = out.write  # type: ignore[attr-defined]
        expected_total: int | None = None
        received = 0
        try:
            for chunk in self._stub.FetchSealedModel(pb.FetchRequest(model_id=model_id), timeout=600):
                if expected_total is None:
                    expected_total = chunk.total_size
                    if expected_total > self._max:
                        raise BootFailure("fetch", "sealed model larger than the configured maximum")
                if chunk.offset != received or chunk.total_size != expected_total:
                    raise BootFailure("fetch", "sealed model stream out of order")
                received += len(chunk.data)
                if received > expected_total:
                    raise BootFailure("fetch", "sealed model stream longer than announced")
                write(chunk.data)
        except grpc.RpcError as err:
            raise BootFailure("fetch", f"cannot fetch the sealed model ({err.code().name})") from None
        if expected_total is None or received != expected_total:
            raise BootFailure("fetch", "sealed model stream ended early")

    def report(self, state: str, *, reason: str = "", step: str = "") -> None:
        """Best effort: a parent that does not listen cannot stop the enclave from serving or failing."""
        try:
            self._stub.ReportStatus(
                pb.StatusReport(state=pb.StatusReport.State.Value(state), reason=reason, step=step,
                                enclave_cid=self.enclave_cid), timeout=5
            )
        except grpc.RpcError as err:
            log.warning("status report %s not delivered (%s)", state, err.code().name)

    def audit_append(self, boot_id: str, lines: list[bytes]) -> None:
        """Store lines at the parent; raises ``grpc.RpcError`` when they were not stored."""
        self._stub.AuditAppend(pb.AuditBatch(boot_id=boot_id, lines=lines, enclave_cid=self.enclave_cid),
                               timeout=5)

    def report_metrics(self, report: pb.MetricsReport) -> None:
        """Send aggregate metrics; raises ``grpc.RpcError`` when the parent did not take them."""
        self._stub.ReportMetrics(report, timeout=5)

    def watch_control(self, on_drain: Callable[[float], None], stopped: threading.Event, *,
                      retry_s: float = 1.0) -> None:
        """Follow the parent's ``Control`` stream until ``stopped`` and :meth:`stop_control` (run it in a
        thread): ``on_drain`` gets each DRAIN's deadline in seconds. A broken stream (a parent that
        restarted) is opened again after ``retry_s``."""
        while not stopped.is_set():
            with self._control_lock:
                stream = self._control = self._stub.Control(pb.ControlRequest(enclave_cid=self.enclave_cid))
                if stopped.is_set():
                    stream.cancel()
            try:
                for command in stream:
                    if command.kind == pb.ControlCommand.DRAIN:
                        on_drain(command.deadline_s)
            except grpc.RpcError as err:
                if stopped.is_set():
                    return
                log.debug("control stream ended (%s)", err.code().name)
            stopped.wait(retry_s)

    def stop_control(self) -> None:
        """End :meth:`watch_control`'s stream (set its ``stopped`` event first)."""
        with self._control_lock:
            if self._control is not None:
                self._control.cancel()

    def close(self) -> None:
        self._channel.close()


class AuditShipper:
    """Non-blocking audit sink: bounded queue → background thread → ``AuditAppend`` (module docstring)."""

    def __init__(self, send: Callable[[str, list[bytes]], None], *, max_pending: int = 4096,
                 batch: int = 256, retry_s: float = 0.5, linger_s: float = 0.01,
                 on_change: Callable[[bool, str], None] | None = None, max_withheld: int = 1000,
                 max_withheld_s: float = 60.0, monotonic: Callable[[], float] = time.monotonic,
                 on_withheld: Callable[[str | None], None] | None = None) -> None:
        self._send = send
        self._max_withheld = max_withheld
        self._max_withheld_s = max_withheld_s
        self._monotonic = monotonic
        self._on_withheld = on_withheld
        self._down_since: float | None = None
        self._withheld: str | None = None
        self._decision = threading.Lock()
        self._linger = linger_s
        self._max = max_pending
        self._batch = batch
        self._retry = retry_s
        self._on_change = on_change
        self._pending: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._down = False
        self._stopping = False
        self._writer: AuditWriter | None = None
        self._thread = threading.Thread(target=self._loop, name="audit-shipper", daemon=True)

    @property
    def down(self) -> bool:
        return self._down

    def withheld(self) -> str | None:
        """Why the audit log counts as withheld by the parent now, or ``None`` (module docstring).

        One decision at a time (a lock over the count, the clock and the state change), so a caller that
        read the clock earlier can never announce a recovery after a later caller announced the outage.
        The count is one snapshot: taken under the writer's lock, which also covers an entry's move from
        the writer's buffer into this shipper's queue."""
        with self._decision:
            writer = self._writer
            unacked = writer.unacknowledged(self._queued) if writer is not None else self._queued()
            with self._cond:
                down_since = self._down_since
            reason: str | None = None
            if unacked > self._max_withheld:
                reason = f"{unacked} audit entries not stored by the parent (bound {self._max_withheld})"
            elif down_since is not None and self._monotonic() - down_since > self._max_withheld_s:
                reason = f"audit sink down for more than {self._max_withheld_s:g} s"
            if (reason is None) != (self._withheld is None):
                self._withheld = reason
                if reason is not None:
                    log.warning("audit withheld: %s; refusing protected calls", reason)
                else:
                    log.warning("audit stored again; serving protected calls")
                if self._on_withheld is not None:
                    try:
                        self._on_withheld(reason)
                    except Exception as err:  # reporting is best effort
                        log.warning("withheld report failed (%s)", type(err).__name__)
            return reason

    def backlog(self) -> float:
        """Audit entries not stored by the parent yet (queued here or buffered in the writer), for metrics."""
        writer = self._writer
        return float(writer.unacknowledged(self._queued) if writer is not None else self._queued())

    @property
    def withheld_reason(self) -> str | None:
        """The last :meth:`withheld` decision (no new one is made)."""
        return self._withheld

    def _queued(self) -> int:
        with self._cond:
            return len(self._pending)

    def __call__(self, line: bytes) -> None:
        with self._cond:
            if self._down or len(self._pending) >= self._max:
                raise ConnectionError("audit sink unavailable")
            self._pending.append(line)
            self._cond.notify()

    def start(self, writer: AuditWriter) -> None:
        """Ship ``writer``'s lines (its boot id names the batches); retry its buffer while degraded."""
        self._writer = writer
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued was stored (shutdown); ``False`` if the parent did not take it."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(5)

    def _loop(self) -> None:
        assert self._writer is not None
        writer = self._writer
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping, self._retry)
                if self._stopping and not self._pending:
                    return
                if self._pending and not self._down:
                    # let a few more lines join the batch: one parent call per call costs the parent
                    # (which also runs the relay) more than the wait costs the log
                    self._cond.wait_for(lambda: len(self._pending) >= self._batch or self._stopping,
                                        self._linger)
                batch = list(islice(self._pending, self._batch))
            if batch:
                try:
                    self._send(writer.boot_id, batch)
                except Exception as err:  # the parent's I/O: any failure means "not stored"
                    with self._cond:
                        was_down, self._down = self._down, True
                        if not was_down:
                            self._down_since = self._monotonic()
                    if not was_down:
                        self._report(True, f"audit sink unavailable ({type(err).__name__})")
                    with self._cond:
                        if self._stopping:
                            return
                        self._cond.wait(self._retry)
                    continue
                with self._cond:
                    for _ in batch:
                        self._pending.popleft()
                    back = self._down and not self._pending
                    if back:
                        self._down = False  # before notifying the writer, so its retries are accepted
                        self._down_since = None
                    self._cond.notify_all()
                if back:
                    self._report(False, "audit sink recovered")
            if not self._down and writer.degraded:
                writer.flush()  # the writer's own buffer (and then its gap entry) go out in order

    def _report(self, down: bool, reason: str) -> None:
        if down:
            log.warning("%s: audit entries are buffered in the enclave", reason)
        else:
            log.warning("%s", reason)
        if self._on_change is not None:
            try:
                self._on_change(down, reason)
            except Exception as err:  # reporting is best effort
                log.warning("degradation report failed (%s)", type(err).__name__)
