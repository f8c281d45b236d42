"""The audit sink path: enclave server → :class:`AuditShipper` → the parent's ``HostServices.AuditAppend``
over real gRPC (unix socket) → rotated files. The parent's host server is stopped mid-session: the enclave
must keep serving, buffer within its bound, report degradation, then recover, and the stored log must verify
with a signed gap entry counting exactly the records lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
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


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[ParentHost, ServerThread, AuditShipper, list[tuple[bool, str]]]]:
    directory = short_socket_dir()
    parent = ParentHost(directory / "h.sock", tmp_path / "audit")
    parent.start()
    host = HostClient(f"unix:{directory / 'h.sock'}", download_dir=tmp_path, max_model_bytes=1)
    changes: list[tuple[bool, str]] = []
    shipper = AuditShipper(host.audit_append, retry_s=0.1, on_change=lambda d, r: changes.append((d, r)))
    config = replace(CONFIG, audit=Audit(checkpoint_every=5, max_buffered=3))
    nsm = make_local_nsm(tmp_path / "pki", {0: bytes([0xA0]) * 48})
    server = ServerThread(config, nsm, str(directory / "g.sock"), audit_sink=shipper)
    shipper.start(server.server.service.protections.audit)
    server.serve(SlowHandler(delay=0))
    try:
        yield parent, server, shipper, changes
    finally:
        shipper.stop()
        server.close()
        host.close()
        parent.close()


def test_sink_down_keeps_serving_then_recovers_with_a_signed_gap(
    rig: tuple[ParentHost, ServerThread, AuditShipper, list[tuple[bool, str]]], tmp_path: Path
) -> None:
    parent, server, shipper, changes = rig
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        document = stub.Attest(pb.AttestRequest(), metadata=metadata, timeout=10).document
        for i in range(4):
            stub.Embed(pb.EmbedRequest(texts=[f"up {i}"]), metadata=metadata, timeout=10)
        assert shipper.drain(5)

        parent.stop()
        for i in range(12):  # far past max_buffered=3: served, the excess counted as lost
            answer = stub.Embed(pb.EmbedRequest(texts=[f"down {i}"]), metadata=metadata, timeout=10)
            assert answer.receipt.payload
        deadline = time.monotonic() + 5
        while not shipper.down and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shipper.down and changes and changes[0][0] is True
        writer = server.server.service.protections.audit
        assert writer.status.degraded and writer.status.dropped_total > 0

        parent.start()
        deadline = time.monotonic() + 10
        while (shipper.down or writer.status.degraded) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not shipper.down and not writer.status.degraded
        assert changes[-1][0] is False
        stub.Embed(pb.EmbedRequest(texts=["after"]), metadata=metadata, timeout=10)
    dropped = writer.status.dropped_total
    writer.close()
    assert shipper.drain(5)
    files = sorted((tmp_path / "audit" / writer.boot_id).glob("audit-*.jsonl"))
    assert len(files) > 1  # rotated at 2 KiB
    report = verify_audit(files, attestation_doc=document, root=load_root(tmp_path / "pki" / "root.pem"),
                          at=datetime.now(UTC))
    assert report.ok, report.first_bad
    assert report.dropped == dropped > 0
    assert report.records == 4 + 1 + 12 + 1 - dropped  # Attest, 4 up, 12 down, 1 after
