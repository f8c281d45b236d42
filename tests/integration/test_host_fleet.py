"""The host channel of several enclaves over real gRPC (unix socket), and the relay's per-connection
choice and drain over real sockets: what each enclave reports is kept apart by its CID, a CID the parent
did not start is refused, each enclave's audit log has its own folder, DRAIN reaches the enclave that is
told, and a draining relay refuses new clients while relayed ones finish."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import until, wait_until

from enclave_app.host import HostClient
from enclave_app.metrics import EnclaveMetrics
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc
from nitrovault.transport import Relay, UnixAddress
from parent_app.host_services import HostServices
from parent_app.host_sources import DirectoryModels, StaticCredentials
from parent_app.metrics import ParentMetrics


class Parent:
    """HostServices for enclaves 16 and 17 on a unix socket, on its own event loop."""

    def __init__(self, d: Path) -> None:
        self.metrics = ParentMetrics()
        self.services = HostServices(credentials=StaticCredentials(d / "none.json"),
                                     models=DirectoryModels(d), region="us-east-1", audit_dir=d / "audit",
                                     cids=(16, 17),
                                     on_call=self.metrics.host_call, on_metrics=self.metrics.enclave_report)
        self.socket = d / "host.sock"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> Any:
        server = grpc.aio.server()
        host_pb2_grpc.add_HostServicesServicer_to_server(self.services, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        return server

    def drain(self, cid: int, deadline: float) -> bool:
        async def tell() -> bool:
            return self.services.drain(cid, deadline)
        return bool(self.run(tell()))

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.services.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def parent(d: Path) -> Iterator[Parent]:
    host = Parent(d)
    yield host
    host.close()


def _client(parent: Parent, d: Path, cid: int) -> HostClient:
    return HostClient(f"unix:{parent.socket}", download_dir=d, max_model_bytes=1 << 20, enclave_cid=cid)


def test_each_enclave_reports_under_its_own_cid(parent: Parent, d: Path) -> None:
    a, b = _client(parent, d, 16), _client(parent, d, 17)
    a.report("BOOTING")
    a.report("SERVING")
    b.report("BOOTING")
    b.report("FAILED", reason="key release refused", step="key-release")
    enclaves = parent.services.enclaves
    assert (enclaves[16].state, enclaves[16].boots) == ("SERVING", 1)
    assert (enclaves[17].state, enclaves[17].step, enclaves[17].boots) == ("FAILED", "key-release", 1)
    assert parent.services.serving() == [16]
    assert parent.services.status.boots == 2
    a.close()
    b.close()


def test_a_cid_the_parent_did_not_start_is_refused(parent: Parent, d: Path) -> None:
    stranger = _client(parent, d, 99)
    stranger.report("SERVING")  # best effort: logged, never raised
    assert 99 not in parent.services.enclaves and parent.services.serving() == []
    with grpc.insecure_channel(f"unix:{parent.socket}") as channel:
        stub = host_pb2_grpc.HostServicesStub(channel)
        serving = pb.StatusReport(state=pb.StatusReport.SERVING, enclave_cid=99)
        for call, message in ((stub.ReportStatus, serving),
                              (stub.ReportMetrics, pb.MetricsReport(enclave_cid=99)),
                              (stub.AuditAppend, pb.AuditBatch(boot_id="ab" * 8, enclave_cid=99))):
            with pytest.raises(grpc.RpcError) as refused:
                call(message, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    stranger.close()


def test_each_enclave_keeps_its_own_audit_folder(parent: Parent, d: Path) -> None:
    a, b = _client(parent, d, 16), _client(parent, d, 17)
    a.audit_append("a1" * 8, [b'{"a":1}\n'])
    b.audit_append("b1" * 8, [b'{"b":1}\n'])
    a.audit_append("a1" * 8, [b'{"a":2}\n'])  # 17's log did not end 16's
    a.audit_append("a2" * 8, [b'{"a":3}\n'])  # 16 rebooted: its old log is complete, 17's goes on
    b.audit_append("b1" * 8, [b'{"b":2}\n'])
    parent.services.close()

    def lines(boot: str) -> list[str]:
        return [line for f in sorted((d / "audit" / boot).glob("audit-*.jsonl"))
                for line in f.read_text().splitlines()]

    assert lines("a1" * 8) == ['{"a":1}', '{"a":2}']
    assert lines("a2" * 8) == ['{"a":3}']
    assert lines("b1" * 8) == ['{"b":1}', '{"b":2}']
    a.close()
    b.close()


def test_metrics_reach_the_parent_per_enclave(parent: Parent, d: Path) -> None:
    metrics = EnclaveMetrics()
    metrics.call("Embed", "OK", 0.01)
    client = _client(parent, d, 17)
    client.report_metrics(metrics.snapshot("ef" * 8, 17))
    bad = metrics.snapshot("ef" * 8, 16)
    bad.counters.append(pb.CounterSample(name="x", labels=[pb.Label(name="who", value="alice@example.com")]))
    client.report_metrics(bad)  # a malformed report is taken (Ack) but dropped, not exported
    assert parent.metrics.dropped_reports == 1
    text = "\n".join(str(m) for m in parent.metrics.collect())
    assert "alice" not in text
    assert set(parent.metrics._reports) == {17}
    client.close()


def test_drain_reaches_the_enclave_that_is_told(parent: Parent, d: Path) -> None:
    told: dict[int, list[float]] = {16: [], 17: []}
    stopped = threading.Event()
    clients = {cid: _client(parent, d, cid) for cid in (16, 17)}
    threads = [threading.Thread(target=clients[cid].watch_control, args=(told[cid].append, stopped),
                                daemon=True) for cid in (16, 17)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(parent.services._controls) == 2, what="both control streams open", timeout=30)
    assert parent.drain(16, 7.5)
    wait_until(lambda: told[16] == [7.5], what="16 told to drain", timeout=30)
    assert told[17] == []  # only the enclave that was told
    stopped.set()
    for client in clients.values():
        client.stop_control()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    wait_until(lambda: not parent.services._controls, what="streams closed at the parent", timeout=30)
    assert parent.drain(17, 1.0) is False  # no stream: it cannot be told (the parent stops it instead)
    for client in clients.values():
        client.close()


def test_the_relay_picks_a_target_per_connection_and_drains(d: Path) -> None:
    async def main() -> None:
        answers: list[str] = []

        async def echo(name: str) -> asyncio.AbstractServer:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                data = await reader.read(100)
                writer.write(name.encode() + data)
                await writer.drain()
                writer.close()
            return await asyncio.start_unix_server(handle, str(d / f"{name}.sock"))

        servers = [await echo("a"), await echo("b")]
        targets = [UnixAddress(str(d / "a.sock")), UnixAddress(str(d / "b.sock"))]
        seen: list[dict[Any, int]] = []

        def choose(active: Any) -> UnixAddress | None:
            seen.append(dict(active))
            return min(targets, key=lambda t: active.get(t, 0)) if targets else None

        relay = Relay(UnixAddress(str(d / "front.sock")), targets[0], choose=choose)
        await relay.start()
        held = await asyncio.open_unix_connection(str(d / "front.sock"))  # stays open: holds "a"
        for _ in range(2):
            reader, writer = await asyncio.open_unix_connection(str(d / "front.sock"))
            writer.write(b"!")
            answers.append((await reader.read(100)).decode())
            writer.close()
            await until(lambda: relay.stats.active == 1, what="the pair released", timeout=30)
        assert answers == ["b!", "b!"]  # "a" holds a connection, so the fewest is "b"
        targets.clear()  # nobody serves: a new client is closed at once
        reader, writer = await asyncio.open_unix_connection(str(d / "front.sock"))
        assert await reader.read(100) == b""
        writer.close()
        assert relay.stats.failed == 1
        relay.stop_accepting()
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(str(d / "front.sock"))
        assert relay.stats.active == 1  # the held connection is still relayed
        assert not await relay.wait_idle(0.0)
        held[1].close()
        assert await relay.wait_idle(30.0)
        await relay.close()
        for server in servers:
            server.close()

    asyncio.run(main())
