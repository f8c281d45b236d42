"""The host services the parent offers its enclaves over vsock: credentials, sealed model bytes, status,
the audit sink, aggregate metrics and the control stream (DRAIN).

Several enclaves share one parent: each names itself by its vsock CID in every report (``enclave_cid``;
none named means the first), and the parent keeps one :class:`EnclaveStatus` per CID
(:attr:`HostServices.enclaves`). A report naming a CID the parent did not start is refused.

The enclave's status reports are the parent's only view of why it is not serving: they carry a coarse
reason and the failed step (never a secret), and are kept as the latest :class:`EnclaveStatus`, written
atomically to a JSON status file for operators and the local stack.

Boots are counted: every enclave boot is one attested KMS ``Decrypt`` (a ``BOOTING`` report precedes it),
so the status carries ``boots`` (since this parent started) and each boot is logged as ``enclave boot N``.
An honest parent's count is for operators; the figure a hostile parent cannot hide is CloudTrail's, which
the CDK app alarms on (docs/deploy.md, "Boots are visible").

Audit sink: the enclave's chained, signed audit lines are stored as they arrive, one folder per enclave
boot (``AUDIT_DIR/<boot id>/audit-NNNNNN.jsonl``, rotated past ``audit_max_bytes``), so each folder
verifies against that boot's attestation document with ``nitrovault audit verify``. The parent cannot
make the log lie undetected; it can only fail to store it, which the enclave sees (an error answer) and
reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from nitrovault.audit import RotatingFileSink
from nitrovault.errors import ConfigError
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc as pb_grpc
from parent_app.host_sources import CredentialsSource, ModelSource

#: the status step an enclave reports when it refuses protected calls because its audit log is not stored
AUDIT_WITHHELD = "audit-withheld"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnclaveStatus:
    state: str
    reason: str
    step: str
    at: float
    #: enclave boots (``BOOTING`` reports: one attested KMS Decrypt each) since this parent started
    boots: int = 0
    #: which enclave (its vsock CID); 0 in the parent's summary of all of them
    cid: int = 0


#: states in which an enclave takes calls (the relay sends it clients, ``/health`` is 200)
TAKES_CALLS = frozenset({"SERVING", "DEGRADED"})


_BOOT_ID = re.compile(r"[0-9a-f]{8,64}")


class HostServices(pb_grpc.HostServicesServicer):
    def __init__(
        self,
        *,
        credentials: CredentialsSource,
        models: ModelSource,
        region: str,
        status_file: Path | None = None,
        on_status: Callable[[EnclaveStatus], None] | None = None,
        audit_dir: Path | None = None,
        audit_max_bytes: int = 10 << 20,
        cids: Sequence[int] = (16,),
        on_call: Callable[[str, str], None] | None = None,
        on_metrics: Callable[[int, pb.MetricsReport], object] | None = None,
    ) -> None:
        if not cids or len(set(cids)) != len(cids):
            raise ConfigError("host services need distinct enclave CIDs")
        self._credentials = credentials
        self._models = models
        self._region = region
        self._status_file = status_file
        self._on_status = on_status
        self._on_call = on_call
        self._on_metrics = on_metrics
        now = time.time()
        #: each enclave's latest status, by CID (the order of ``cids``)
        self.enclaves: dict[int, EnclaveStatus] = {
            c: EnclaveStatus("BOOTING", "", "", now, 0, c) for c in cids}
        self._default_cid = cids[0]
        self._controls: dict[int, asyncio.Queue[pb.ControlCommand]] = {}
        self._audit_dir = audit_dir
        self._audit_max = audit_max_bytes
        self._audit_sinks: dict[str, tuple[int, RotatingFileSink]] = {}
        self._audit_lock = threading.Lock()

    @property
    def status(self) -> EnclaveStatus:
        """The summary: the first enclave that takes calls (else the first enclave's status), boots summed."""
        statuses = list(self.enclaves.values())
        best = next((e for e in statuses if e.state in TAKES_CALLS), statuses[0])
        return replace(best, boots=sum(e.boots for e in statuses), cid=0)

    def serving(self) -> list[int]:
        """CIDs of the enclaves that take calls now, in order."""
        return [cid for cid, e in self.enclaves.items() if e.state in TAKES_CALLS]

    def _cid(self, reported: int) -> int | None:
        cid = reported or self._default_cid  # an enclave that does not say is the first one
        return cid if cid in self.enclaves else None

    async def _known(self, reported: int, method: str, context: grpc.aio.ServicerContext) -> int:
        """The reporting enclave's CID, counted as an OK call; a CID this parent did not start is refused."""
        cid = self._cid(reported)
        if cid is None:
            self._count(method, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown enclave CID")
            raise AssertionError("unreachable")  # abort raises
        self._count(method, "OK")
        return cid

    def _count(self, method: str, code: str) -> None:
        if self._on_call is not None:
            self._on_call(method, code)

    async def GetCredentials(
        self, request: pb.CredentialsRequest, context: grpc.aio.ServicerContext
    ) -> pb.Credentials:
        try:
            creds = self._credentials.get()
        except (ConfigError, OSError, ValueError, KeyError) as err:
            log.error("credentials unavailable: %s", type(err).__name__)
            self._count("GetCredentials", "UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credentials unavailable")
            raise
        self._count("GetCredentials", "OK")
        expiration = Timestamp()
        if creds.expiration is not None:
            expiration.FromDatetime(creds.expiration)
        return pb.Credentials(
            access_key_id=creds.access_key_id,
            secret_access_key=creds.secret_access_key,
            session_token=creds.session_token,
            expiration=expiration,
            region=self._region,
        )

    async def FetchSealedModel(
        self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        try:
            total = self._models.size(request.model_id)
        except ConfigError:
            self._count("FetchSealedModel", "NOT_FOUND")
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such sealed model")
            raise
        self._count("FetchSealedModel", "OK")
        offset = min(request.offset, total)
        length = total - offset if request.length == 0 else min(request.length, total - offset)
        for data in self._models.read(request.model_id, offset, length):
            yield pb.Chunk(data=data, offset=offset, total_size=total)
            offset += len(data)

    async def ReportStatus(self, request: pb.StatusReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        cid = await self._known(request.enclave_cid, "ReportStatus", context)
        state = pb.StatusReport.State.Name(request.state)
        before = self.enclaves[cid]
        boots = before.boots
        if state == "BOOTING":
            boots += 1
            log.warning("enclave boot %d: the enclave attests to KMS (one Decrypt with a Recipient; "
                        "enclave %d)", boots, cid)
        status = EnclaveStatus(state, request.reason[:512], request.step[:64], time.time(), boots, cid)
        self.enclaves[cid] = status
        log.info("enclave %d status %s step=%s reason=%s", cid, state, status.step, status.reason)
        if status.step == AUDIT_WITHHELD:  # for operators; the AuditWithheld alarm reads the enclave's gauge
            log.warning("audit-withheld: the enclave refuses protected calls until its audit log is stored "
                        "(%s)", status.reason)
        self.write_status()
        if self._on_status is not None:
            self._on_status(status)
        return pb.Ack()

    async def ReportMetrics(self, request: pb.MetricsReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        cid = await self._known(request.enclave_cid, "ReportMetrics", context)
        if self._on_metrics is not None:
            self._on_metrics(cid, request)
        return pb.Ack()

    async def Control(self, request: pb.ControlRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControlCommand]:
        cid = await self._known(request.enclave_cid, "Control", context)
        queue: asyncio.Queue[pb.ControlCommand] = asyncio.Queue()
        self._controls[cid] = queue  # the latest stream of an enclave is the one that counts
        try:
            while True:
                yield await queue.get()
        finally:
            if self._controls.get(cid) is queue:
                del self._controls[cid]

    def drain(self, cid: int, deadline_s: float) -> bool:
        """Tell enclave ``cid`` to drain; ``False`` if it has no control stream open (it cannot be told)."""
        queue = self._controls.get(cid)
        if queue is None:
            return False
        queue.put_nowait(pb.ControlCommand(kind=pb.ControlCommand.DRAIN, deadline_s=deadline_s))
        return True

    async def AuditAppend(self, request: pb.AuditBatch, context: grpc.aio.ServicerContext) -> pb.Ack:
        cid = self._cid(request.enclave_cid)
        if self._audit_dir is None:
            self._count("AuditAppend", "UNIMPLEMENTED")
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no audit sink configured")
        if cid is None or not _BOOT_ID.fullmatch(request.boot_id):
            self._count("AuditAppend", "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad boot id or enclave CID")
            raise AssertionError("unreachable")
        try:
            sink = self._audit_sink(cid, request.boot_id)
            for line in request.lines:
                sink(bytes(line))
        except OSError as err:
            log.error("audit sink cannot write: %s", type(err).__name__)
            self._count("AuditAppend", "UNAVAILABLE")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit sink cannot write")
        self._count("AuditAppend", "OK")
        return pb.Ack()

    def _audit_sink(self, cid: int, boot_id: str) -> RotatingFileSink:
        assert self._audit_dir is not None
        with self._audit_lock:
            found = self._audit_sinks.get(boot_id)
            if found is None:
                for old_id, (old_cid, old) in list(self._audit_sinks.items()):
                    if old_cid == cid:  # that enclave restarted: its old log is complete
                        old.close()
                        del self._audit_sinks[old_id]
                found = self._audit_sinks[boot_id] = (
                    cid, RotatingFileSink(self._audit_dir / boot_id, self._audit_max))
                log.info("audit log of enclave %d boot %s in %s", cid, boot_id, self._audit_dir / boot_id)
            return found[1]

    def close(self) -> None:
        with self._audit_lock:
            for _, sink in self._audit_sinks.values():
                sink.close()
            self._audit_sinks.clear()

    def mark(self, state: str, reason: str = "", step: str = "", *, cid: int | None = None) -> None:
        """Record a status the parent itself observed (e.g. the enclave process exited)."""
        cid = self._default_cid if cid is None else cid
        before = self.enclaves[cid]
        self.enclaves[cid] = EnclaveStatus(state, reason, step, time.time(), before.boots, cid)
        self.write_status()

    def write_status(self) -> None:
        if self._status_file is None:
            return
        doc = asdict(self.status)
        doc["enclaves"] = {str(cid): asdict(e) for cid, e in self.enclaves.items()}
        tmp = self._status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self._status_file)
