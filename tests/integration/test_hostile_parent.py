"""The hostile parent against the confidential path, through the local stack's real processes.

The parent instance is untrusted: whatever it relays must be ciphertext, whatever it changes must break
the TLS session (the client sees UNAVAILABLE, never a wrong answer), and wherever it sends the client,
the client must refuse before its token leaves it. Each test plays one such parent between the client
and the stack's public relay: a recording relay, a bit-flipping relay, a relay to a look-alike server.
The last test dumps the parent process's memory after a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nitrovault.errors import ClientError, TlsBindingError
from nitrovault.identity import TlsIdentity
from nitrovault.local.homes import free_port
from nitrovault.local.stack import TLS_SERVER_NAME, LocalStack
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

Tamper = Callable[[int, bytes], bytes]
UP, DOWN = 0, 1


class EvilRelay:
    """A TCP relay run by the hostile parent: it records every byte both ways and may rewrite them."""

    def __init__(self, target: tuple[str, int], tamper: Tamper | None = None) -> None:
        self.target = target
        self.tamper = tamper
        self.recorded = [bytearray(), bytearray()]
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self._run(asyncio.start_server(self._pipe_pair, "127.0.0.1", self.port))

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(10)

    async def _pipe_pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, up_writer, UP), self._pipe(up_reader, writer, DOWN),
                                 return_exceptions=True)
        finally:
            self.tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: int) -> None:
        try:
            while data := await reader.read(65536):
                self.recorded[direction] += data
                writer.write(self.tamper(direction, data) if self.tamper else data)
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self._run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def stack_address(stack: LocalStack) -> tuple[str, int]:
    host, port = stack.listen.rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def relay_for(stack: LocalStack) -> Iterator[Callable[..., EvilRelay]]:
    made: list[EvilRelay] = []

    def make(tamper: Tamper | None = None, target: tuple[str, int] | None = None) -> EvilRelay:
        relay = EvilRelay(target or stack_address(stack), tamper)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.close()


TEXTS = ["the quarterly merger plan for Zebulon Holdings", "patient 4711 reports chest pain"]


def test_a_recording_parent_sees_neither_token_nor_inputs_nor_outputs(
    stack: LocalStack, relay_for: Callable[..., EvilRelay]
) -> None:
    relay = relay_for()
    token = stack.token("recorded-subject")
    with stack.client(token, target=relay.listen, timeout=30) as client:
        vectors = client.embed(TEXTS)
        info = client.info()
    recording = bytes(relay.recorded[UP] + relay.recorded[DOWN])
    assert len(relay.recorded[UP]) > 1000 and len(relay.recorded[DOWN]) > 1000  # the session went through
    assert token.encode() not in recording
    assert token.split(".")[1].encode() not in recording  # not even the claims
    for text in TEXTS:
        assert text.encode() not in recording
    for row in vectors:  # no output value, as the float32 bytes the enclave sent
        assert row[:4].astype(np.float32).tobytes() not in recording
    assert info.model_id.encode() not in recording


def test_a_relay_that_flips_a_bit_breaks_the_session_never_the_answer(
    stack: LocalStack, relay_for: Callable[..., EvilRelay]
) -> None:
    flipped = {"done": False}
    seen = [0]

    def flip_late_in_the_answer(direction: int, data: bytes) -> bytes:
        if direction != DOWN or flipped["done"]:
            return data
        seen[0] += len(data)
        if seen[0] < 6000:  # past the handshake and the attestation: inside the Embed answer
            return data
        flipped["done"] = True
        out = bytearray(data)
        out[len(out) // 2] ^= 0x01
        return bytes(out)

    relay = relay_for(flip_late_in_the_answer)
    with stack.client(stack.token("flipped"), target=relay.listen, timeout=30) as client:
        outcomes = []
        for _ in range(4):
            try:
                outcomes.append(client.embed(TEXTS).shape)
            except ClientError as err:
                outcomes.append(err.code)
    assert flipped["done"]
    assert "UNAVAILABLE" in outcomes
    assert set(outcomes) <= {"UNAVAILABLE", (2, 384)}  # a broken session, or a genuine answer: nothing else


class LookAlike:
    """The parent's own server: its own TLS key, and every Attest answered with a genuine document fetched
    from the real enclave (so PCRs, chain and nonce all check out). It records every token it is sent."""

    def __init__(self, stack: LocalStack, identity: TlsIdentity) -> None:
        self.tokens: list[str] = []
        self.calls: list[str] = []
        self.genuine = stack.channel()
        genuine_stub = pb_grpc.InferenceStub(self.genuine)  # type: ignore[no-untyped-call]
        look_alike = self

        class Servicer(pb_grpc.InferenceServicer):
            def _seen(self, name: str, context: grpc.ServicerContext) -> None:
                look_alike.calls.append(name)
                metadata = context.invocation_metadata()
                look_alike.tokens.extend(str(v) for k, v in metadata if k == "authorization")

            def Attest(self, request: pb.AttestRequest, context: grpc.ServicerContext) -> pb.AttestResponse:
                self._seen("Attest", context)
                return genuine_stub.Attest(request, timeout=30)

            def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
                self._seen("Embed", context)
                return pb.EmbedResponse(model_id="forged")

        class Health(health_pb2_grpc.HealthServicer):
            def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
                look_alike.calls.append("Check")
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        from concurrent.futures import ThreadPoolExecutor

        self.server = grpc.server(ThreadPoolExecutor(4))
        pb_grpc.add_InferenceServicer_to_server(Servicer(), self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(Health(), self.server)
        self.port = self.server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(identity.private_key_pem, identity.chain_pem)]))
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)
        self.genuine.close()


def test_a_parent_that_sends_the_client_to_a_look_alike_gets_no_token(
    stack: LocalStack, relay_for: Callable[..., EvilRelay]
) -> None:
    same_name = TlsIdentity.generate(TLS_SERVER_NAME, now=datetime.now(UTC))  # its own key, the same name
    fake = LookAlike(stack, same_name)
    try:
        relay = relay_for(target=("127.0.0.1", fake.port))
        with stack.client(stack.token("victim"), target=relay.listen, timeout=30) as client, \
                pytest.raises(TlsBindingError):
            client.embed(TEXTS)
        assert fake.calls == ["Attest"]  # it was asked to attest, and for nothing else
        assert fake.tokens == []
    finally:
        fake.close()


def _readable_memory(pid: int) -> Iterator[bytes]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            with contextlib.suppress(OSError, ValueError, OverflowError):
                mem.seek(start)
                yield mem.read(end - start)


def test_the_parent_process_memory_holds_no_token_and_no_input(stack: LocalStack) -> None:
    token = stack.token("dumped-subject")
    secret_text = "the launch code is 7-alpha-7 for memory dump tests"
    with stack.client(token, timeout=30) as client:
        for _ in range(3):
            client.embed([secret_text])
    pids = stack.parent_pids()
    assert pids, "parent process not found"
    needles = {"token": token.encode(), "claims": token.split(".")[1].encode(), "text": secret_text.encode(),
               # in the parent's own argv: the one needle the dump must find
               "control": str(stack.paths.parent_config).encode()}
    found: set[str] = set()
    for region in _readable_memory(pids[0]):
        found |= {name for name, needle in needles.items() if needle in region}
    assert found == {"control"}
