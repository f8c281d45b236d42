"""The parent's public gRPC endpoint: a byte-level pass-through to the enclave's gRPC server.

The parent is untrusted (``../shared/DESIGN.md``): it relays calls and never needs to understand a
payload. Authentication, quotas, health and reflection all live in the enclave; they pass through here
unchanged because every method name is forwarded.

Invariants:

* No payload is deserialised: both the server handler and the upstream stub use identity
  (de)serialisers, so messages are opaque ``bytes`` end to end. The bridge imports no protobuf module.
* Any call can be handled as **stream-stream**. gRPC's wire format does not depend on cardinality (a
  unary call is a stream of one message each way), so one generic stream-stream relay carries
  unary-unary, unary-stream, stream-unary and stream-stream calls without knowing which a method is;
  the enclave's real handler enforces the cardinality. (The same design as Go's ``mwitkow/grpc-proxy``;
  there is no library for it in Python, hence this module.) Methods named in ``unary_methods`` (by
  default the inference API and the health check) take a unary fast path: grpc.aio's streaming
  machinery costs about a millisecond per call, the unary path a fraction of it. A method wrongly
  listed as unary fails cleanly (the client sees an error), it never mixes up messages.
* The incoming call's remaining time becomes the upstream timeout; cancelling the incoming call
  cancels the upstream call.
* Invocation metadata is forwarded except pseudo-headers, hop-by-hop headers and ``grpc-`` reserved
  keys; the upstream's initial and trailing metadata, status code and details come back unchanged.
* Limits: ``max_concurrent_calls`` calls in flight over all connections (beyond it:
  RESOURCE_EXHAUSTED at once), ``max_streams_per_connection`` HTTP/2 streams per connection, and
  ``max_message_bytes`` per message in both directions on both hops (gRPC answers
  RESOURCE_EXHAUSTED).
* While the enclave is down a call fails with UNAVAILABLE within ``connect_timeout`` (no
  ``wait_for_ready``, short reconnect backoff), and calls succeed again once it is back, without a
  restart of the bridge.
* TLS (optional) ends on the parent only for the client-to-parent hop; application-level trust
  (signed tokens, receipts) is end to end with the enclave and does not depend on it.

Example::

    bridge = Bridge("0.0.0.0:8443", "unix:/run/nitrovault/enclave.sock",
                    tls=TlsConfig.from_files("cert.pem", "key.pem"))
    port = await bridge.start()
    ...
    await bridge.stop(grace=5)

Command line: ``python -m parent_app.bridge --listen 0.0.0.0:8443 --upstream unix:/run/nv/enclave.sock
[--tls-cert cert.pem --tls-key key.pem]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nitrovault.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 1024 * 1024

#: Keys never forwarded in either direction: HTTP/2 pseudo-headers start with ``:``; these are
#: hop-by-hop or owned by each hop's gRPC stack (``grpc-`` keys are reserved by the gRPC protocol).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "content-type",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)

Metadata = tuple[tuple[str, str | bytes], ...]

#: Methods forwarded on the unary fast path (their cardinality is part of the public API, not a payload).
DEFAULT_UNARY_METHODS = frozenset(
    {
        "/nitrovault.v1.Inference/Infer",
        "/nitrovault.v1.Inference/Embed",
        "/nitrovault.v1.Inference/Info",
        "/nitrovault.v1.Inference/Attest",
        "/grpc.health.v1.Health/Check",
    }
)


def forwardable_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """The metadata one hop may pass to the next (pure)."""
    out = []
    for key, value in metadata or ():
        k = key.lower()
        if k.startswith((":", "grpc-")) or k in HOP_BY_HOP:
            continue
        out.append((k, value))
    return tuple(out)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the public listener.

    certificate_chain_pem: the server certificate, then intermediates (PEM).
    private_key_pem: its private key (PEM); never printed (``repr`` hides it).
    client_ca_pem: when set, clients must present a certificate issued by these CAs (mutual TLS).
    """

    certificate_chain_pem: bytes
    private_key_pem: bytes = field(repr=False)
    client_ca_pem: bytes | None = None

    def __post_init__(self) -> None:
        if b"-----BEGIN" not in self.certificate_chain_pem or b"-----BEGIN" not in self.private_key_pem:
            raise ConfigError("TLS certificate and key must be PEM")

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> TlsConfig:
        try:
            return cls(
                Path(cert).read_bytes(),
                Path(key).read_bytes(),
                Path(client_ca).read_bytes() if client_ca is not None else None,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file: {exc.filename}") from exc

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key_pem, self.certificate_chain_pem)],
            root_certificates=self.client_ca_pem,
            require_client_auth=self.client_ca_pem is not None,
        )


class Bridge:
    """Public gRPC server that forwards every call, as bytes, to ``upstream`` (the enclave)."""

    def __init__(
        self,
        listen: str,
        upstream: str,
        *,
        tls: TlsConfig | None = None,
        max_concurrent_calls: int = 256,
        max_message_bytes: int = 8 * MiB,
        max_streams_per_connection: int = 100,
        connect_timeout: float = 0.25,
        unary_methods: Iterable[str] = DEFAULT_UNARY_METHODS,
    ) -> None:
        for name, value in (
            ("max_concurrent_calls", max_concurrent_calls),
            ("max_message_bytes", max_message_bytes),
            ("max_streams_per_connection", max_streams_per_connection),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not connect_timeout > 0:
            raise ConfigError("connect_timeout must be positive")
        if not listen or not upstream:
            raise ConfigError("listen and upstream addresses are required")
        self.listen = listen
        self.upstream = upstream
        self.tls = tls
        self.max_concurrent_calls = max_concurrent_calls
        self.max_message_bytes = max_message_bytes
        self.max_streams_per_connection = max_streams_per_connection
        self.connect_timeout = connect_timeout
        self.unary_methods = frozenset(unary_methods)
        self._in_flight = 0
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def in_flight(self) -> int:
        """Calls being forwarded right now."""
        return self._in_flight

    async def start(self) -> int:
        """Bind and serve; returns the bound port (for ``host:0``; gRPC returns 1 for unix sockets)."""
        if self._server is not None:
            raise RuntimeError("bridge already started")
        backoff_ms = max(int(self.connect_timeout * 1000), 50)
        self._channel = grpc.aio.insecure_channel(
            self.upstream,
            options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # Reconnect soon after the enclave comes back; also bounds each connect attempt.
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.min_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", self.max_streams_per_connection),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((_PassThrough(self),))
        try:
            if self.tls is not None:
                port = int(server.add_secure_port(self.listen, self.tls.server_credentials()))
            else:
                port = int(server.add_insecure_port(self.listen))
        except RuntimeError as exc:
            await self._channel.close()
            self._channel = None
            raise ConfigError(f"cannot listen on {self.listen}") from exc
        await server.start()
        self._server = server
        log.info(
            "bridge listening on %s (tls=%s), forwarding to %s",
            self.listen,
            self.tls is not None,
            self.upstream,
        )
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- forwarding ------------------------------------------------------------------------------------

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        if self._in_flight >= self.max_concurrent_calls:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "bridge is at its concurrent call limit")
        self._in_flight += 1
        try:
            await self._relay(method, requests, context)
        finally:
            self._in_flight -= 1

    async def forward_unary(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        if self._in_flight >= self.max_concurrent_calls:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "bridge is at its concurrent call limit")
        self._in_flight += 1
        try:
            channel = await self._checked_channel(context)
            call = channel.unary_unary(method)(
                request,
                timeout=context.time_remaining(),
                metadata=grpc.aio.Metadata(*forwardable_metadata(context.invocation_metadata())),
                wait_for_ready=False,
            )
            try:
                response: bytes = await call
            except grpc.aio.AioRpcError as err:
                await context.abort(
                    err.code(), err.details() or "", forwardable_metadata(err.trailing_metadata())
                )
                raise  # unreachable: abort raises
            finally:
                call.cancel()
            initial = await call.initial_metadata()
            if initial:
                await context.send_initial_metadata(forwardable_metadata(initial))
            context.set_trailing_metadata(forwardable_metadata(await call.trailing_metadata()))
            return response
        finally:
            self._in_flight -= 1

    async def _checked_channel(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> grpc.aio.Channel:
        channel = self._channel
        if channel is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "bridge is stopping")
            raise AssertionError("unreachable")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if not await self._upstream_ready(channel, remaining):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "enclave is unavailable")
        return channel

    async def _upstream_ready(self, channel: grpc.aio.Channel, remaining: float | None) -> bool:
        state = channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return True
        budget = self.connect_timeout if remaining is None else min(self.connect_timeout, remaining)
        try:
            await asyncio.wait_for(channel.channel_ready(), budget)
        except TimeoutError:
            return False
        return True

    async def _relay(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        channel = await self._checked_channel(context)
        remaining = context.time_remaining()
        call = channel.stream_stream(method)(
            requests,
            timeout=remaining,
            metadata=grpc.aio.Metadata(*forwardable_metadata(context.invocation_metadata())),
            wait_for_ready=False,
        )
        try:
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(forwardable_metadata(initial))
                async for response in call:
                    await context.write(response)
            except grpc.aio.AioRpcError:
                pass  # the status, details and trailers are read from the call below
            code = await call.code()
            details = await call.details()
            trailing = forwardable_metadata(await call.trailing_metadata())
        finally:
            call.cancel()  # no-op when the call is done; otherwise the client went away
        if code is grpc.StatusCode.OK:
            context.set_trailing_metadata(trailing)
            return
        await context.abort(code, details or "", trailing)


class _PassThrough(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no type stubs
    """Claims every method as stream-stream with identity (de)serialisers."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method: Any = handler_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        bridge = self._bridge
        if name in bridge.unary_methods:

            async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                return await bridge.forward_unary(name, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)

        async def behavior(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> None:
            await bridge.forward(name, requests, context)

        return grpc.stream_stream_rpc_method_handler(behavior)


# -- command line -------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parent_app.bridge", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help='public gRPC address, e.g. "0.0.0.0:8443" or "unix:/path"')
    p.add_argument(
        "--upstream", required=True, help='the enclave gRPC target, e.g. "unix:/run/nv/enclave.sock"'
    )
    p.add_argument("--tls-cert", help="PEM certificate chain for the public listener")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle; when given, clients must present certificates")
    p.add_argument("--max-concurrent-calls", type=int, default=256)
    p.add_argument("--max-message-bytes", type=int, default=8 * MiB)
    p.add_argument("--max-streams-per-connection", type=int, default=100)
    p.add_argument("--connect-timeout", type=float, default=0.25)
    p.add_argument("--grace", type=float, default=5.0, help="seconds running calls get on shutdown")
    return p


def bridge_from_args(argv: Sequence[str] | None = None) -> tuple[Bridge, float]:
    args = _parser().parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    bridge = Bridge(
        args.listen,
        args.upstream,
        tls=tls,
        max_concurrent_calls=args.max_concurrent_calls,
        max_message_bytes=args.max_message_bytes,
        max_streams_per_connection=args.max_streams_per_connection,
        connect_timeout=args.connect_timeout,
    )
    return bridge, args.grace


async def _serve(bridge: Bridge, grace: float) -> None:
    await bridge.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await bridge.stop(grace)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        bridge, grace = bridge_from_args(argv)
        asyncio.run(_serve(bridge, grace))
    except ConfigError as exc:
        log.error("%s", exc.diagnostics())
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
