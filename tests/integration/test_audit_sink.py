"""The audit sink path: enclave server → :class:`AuditShipper` → the parent's ``HostServices.AuditAppend``
over real gRPC (unix socket) → rotated files. The parent's host server is stopped mid-session: the enclave
serves on while the unstored entries stay within ``audit.max_withheld_records``, then refuses protected
calls (UNAVAILABLE, reason ``audit-withheld``), reports degradation, recovers once the parent stores again,
and the stored log verifies with a signed gap entry counting exactly the records lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_enclave_server import CONFIG, TOKEN, ServerThread, SlowHandler, short_socket_dir

from enclave_app.config import Audit
from enclave_app.host import AuditShipper, HostClient
from nitrovault.attestation import load_root
from nitrovault.audit import verify_audit
from nitrovault.local.nsm import make_local_nsm
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc
from parent_app.host_services import HostServices
from parent_app.host_sources import DirectoryModels, StaticCredentials


class ParentHost:
    """The parent's HostServices on a unix socket, on its own event loop; can be stopped and restarted."""

    def __init__(self, socket_path: Path, audit_dir: Path) -> None:
        self.socket_path = socket_path
        self.services = HostServices(credentials=StaticCredentials(audit_dir / "none.json"),
                                     models=DirectoryModels(audit_dir), region="us-east-1",
                                     audit_dir=audit_dir, audit_max_bytes=2048)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> None:
        async def make() -> Any:
            server = grpc.aio.server()
            host_pb2_grpc.add_HostServicesServicer_to_server(self.services, server)
            server.add_insecure_port(f"unix:{self.socket_path}")
            await server.start()
            return server

        self.server = self._run(make())

    def stop(self) -> None:
        self._run(self.server.stop(0))

    def close(self) -> None:
        self.stop()
        self.services.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Changes:
    """The shipper's reports, and an event per kind, so a test waits on the report, not on a clock."""

    def __init__(self) -> None:
        self.sink: list[tuple[bool, str]] = []
        self.withheld: list[str | None] = []
        self.recovered = threading.Event()
        self.down = threading.Event()

    def on_change(self, down: bool, reason: str) -> None:
        self.sink.append((down, reason))
        (self.down if down else self.recovered).set()

    def on_withheld(self, reason: str | None) -> None:
        self.withheld.append(reason)


#: entries the parent may leave unstored before protected calls are refused
MAX_WITHHELD = 6


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[ParentHost, ServerThread, AuditShipper, Changes]]:
    directory = short_socket_dir()
    parent = ParentHost(directory / "h.sock", tmp_path / "audit")
    parent.start()
    host = HostClient(f"unix:{directory / 'h.sock'}", download_dir=tmp_path, max_model_bytes=1)
    changes = Changes()
    shipper = AuditShipper(host.audit_append, retry_s=0.1, on_change=changes.on_change,
                           on_withheld=changes.on_withheld, max_withheld=MAX_WITHHELD)
    config = replace(CONFIG, audit=Audit(checkpoint_every=5, max_buffered=3,
                                         max_withheld_records=MAX_WITHHELD))
    nsm = make_local_nsm(tmp_path / "pki", {0: bytes([0xA0]) * 48})
    server = ServerThread(config, nsm, str(directory / "g.sock"), audit_sink=shipper)
    server.server.service.protections.audit_withheld = shipper.withheld
    shipper.start(server.server.service.protections.audit)
    server.serve(SlowHandler(delay=0))
    try:
        yield parent, server, shipper, changes
    finally:
        shipper.stop()
        server.close()
        host.close()
        parent.close()


def test_a_withheld_log_stops_protected_calls_then_recovers_with_a_signed_gap(
    rig: tuple[ParentHost, ServerThread, AuditShipper, Changes], tmp_path: Path
) -> None:
    parent, server, shipper, changes = rig
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    writer = server.server.service.protections.audit
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        document = stub.Attest(pb.AttestRequest(), metadata=metadata, timeout=10).document
        for i in range(4):
            stub.Embed(pb.EmbedRequest(texts=[f"up {i}"]), metadata=metadata, timeout=10)
        assert shipper.drain(30)

        parent.stop()  # from here no entry can be stored
        stub.Attest(pb.AttestRequest(), timeout=10)  # public, audited: its record finds the sink down
        assert changes.down.wait(60)  # the shipper's report, so every later entry is counted the same way
        served = refused = 0
        for i in range(12):
            try:
                answer = stub.Embed(pb.EmbedRequest(texts=[f"down {i}"]), metadata=metadata, timeout=10)
                assert answer.receipt.payload
                served += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert err.details() == "service temporarily unavailable; retry later"
                refused += 1
        # unstored: the Attest record (queued), 3 buffered, then each record lost; the 7th call finds 7
        assert (served, refused) == (6, 6)
        assert changes.withheld and changes.withheld[0] is not None
        with grpc.insecure_channel(server.target) as attest:  # Attest needs no audit: still answered
            assert pb_grpc.InferenceStub(attest).Attest(pb.AttestRequest(), timeout=10).document

        parent.start()
        assert changes.recovered.wait(60)  # the shipper's own report that the parent stores again
        writer.flush()  # hand the writer's buffer (and its gap entry) to the shipper, then wait for it
        assert shipper.drain(30)
        assert not writer.status.degraded
        stub.Embed(pb.EmbedRequest(texts=["after"]), metadata=metadata, timeout=10)
        assert changes.withheld[-1] is None  # announced once each way
        assert [d for d, _ in changes.sink][:1] == [True] and changes.sink[-1][0] is False
    dropped = writer.status.dropped_total
    writer.close()
    assert shipper.drain(30)
    files = sorted((tmp_path / "audit" / writer.boot_id).glob("audit-*.jsonl"))
    assert len(files) > 1  # rotated at 2 KiB
    report = verify_audit(files, attestation_doc=document, root=load_root(tmp_path / "pki" / "root.pem"),
                          at=datetime.now(UTC))
    assert report.ok, report.first_bad
    # lost while withheld: 3 served calls past the writer's buffer, the 6 refusals and the Attest: one gap
    assert report.dropped == dropped == 10
    assert report.records == 1 + 4 + 1 + 12 + 1 + 1 - dropped  # Attest, 4 up, Attest, 12 down, Attest, after
