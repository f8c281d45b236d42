"""The host services the parent offers the enclave over vsock: credentials, sealed model bytes, status,
and the audit sink.

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

import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
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
    ) -> None:
        self._credentials = credentials
        self._models = models
        self._region = region
        self._status_file = status_file
        self._on_status = on_status
        self.status = EnclaveStatus("BOOTING", "", "", time.time())
        self._audit_dir = audit_dir
        self._audit_max = audit_max_bytes
        self._audit_sinks: dict[str, RotatingFileSink] = {}
        self._audit_lock = threading.Lock()

    async def GetCredentials(
        self, request: pb.CredentialsRequest, context: grpc.aio.ServicerContext
    ) -> pb.Credentials:
        try:
            creds = self._credentials.get()
        except (ConfigError, OSError, ValueError, KeyError) as err:
            log.error("credentials unavailable: %s", type(err).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "credentials unavailable")
            raise
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
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such sealed model")
            raise
        offset = min(request.offset, total)
        length = total - offset if request.length == 0 else min(request.length, total - offset)
        for data in self._models.read(request.model_id, offset, length):
            yield pb.Chunk(data=data, offset=offset, total_size=total)
            offset += len(data)

    async def ReportStatus(self, request: pb.StatusReport, context: grpc.aio.ServicerContext) -> pb.Ack:
        state = pb.StatusReport.State.Name(request.state)
        boots = self.status.boots
        if state == "BOOTING":
            boots += 1
            log.warning("enclave boot %d: the enclave attests to KMS (one Decrypt with a Recipient)", boots)
        self.status = EnclaveStatus(state, request.reason[:512], request.step[:64], time.time(), boots)
        log.info("enclave status %s step=%s reason=%s", state, self.status.step, self.status.reason)
        if self.status.step == AUDIT_WITHHELD:  # the CDK app's AuditWithheld alarm counts these lines
            log.warning("audit-withheld: the enclave refuses protected calls until its audit log is stored "
                        "(%s)", self.status.reason)
        self.write_status()
        if self._on_status is not None:
            self._on_status(self.status)
        return pb.Ack()

    async def AuditAppend(self, request: pb.AuditBatch, context: grpc.aio.ServicerContext) -> pb.Ack:
        if self._audit_dir is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no audit sink configured")
        if not _BOOT_ID.fullmatch(request.boot_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad boot id")
        try:
            sink = self._audit_sink(request.boot_id)
            for line in request.lines:
                sink(bytes(line))
        except OSError as err:
            log.error("audit sink cannot write: %s", type(err).__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "audit sink cannot write")
        return pb.Ack()

    def _audit_sink(self, boot_id: str) -> RotatingFileSink:
        assert self._audit_dir is not None
        with self._audit_lock:
            sink = self._audit_sinks.get(boot_id)
            if sink is None:
                for old in self._audit_sinks.values():  # an enclave restarted: its old log is complete
                    old.close()
                self._audit_sinks = {boot_id: RotatingFileSink(self._audit_dir / boot_id, self._audit_max)}
                sink = self._audit_sinks[boot_id]
                log.info("audit log of boot %s in %s", boot_id, self._audit_dir / boot_id)
            return sink

    def close(self) -> None:
        with self._audit_lock:
            for sink in self._audit_sinks.values():
                sink.close()
            self._audit_sinks.clear()

    def mark(self, state: str, reason: str = "", step: str = "") -> None:
        """Record a status the parent itself observed (e.g. the enclave process exited)."""
        self.status = EnclaveStatus(state, reason, step, time.time(), self.status.boots)
        self.write_status()

    def write_status(self) -> None:
        if self._status_file is None:
            return
        tmp = self._status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.status)))
        os.replace(tmp, self._status_file)
