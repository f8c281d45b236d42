"""The parent's composition: the public TCP relay, the health endpoint, host services, enclave supervision.

``run`` is called by a composition root that picks how vsock is reached: ``python -m parent_app`` in
production (real ``AF_VSOCK``), the local stack's runner (``nitrovault.local.parent``) locally. Plumbing::

    tcp listen ──► relay (layer 4, TLS record headers checked) ──► vsock(enclave_cid, inference)
                                                          (TLS 1.3 + HTTP/2 end inside the enclave)
    tcp health_listen ──► GET /health: 200 while the enclave reports SERVING, else 503
    vsock(3, host_services) ──► relay ──► unix RUN/host.sock (HostServices gRPC)
    vsock(3, kms_proxy) ──► relay ──► KMS (local only; AWS's vsock-proxy in production)
    vsock(3, state_store) ──► relay ──► the shared state store (local only; a second vsock-proxy in
                                        production); the enclave's TLS and AUTH pass through unread

The parent is hostile by design: on the public path it only copies ciphertext. It terminates no TLS,
parses no HTTP/2 and sees no payload or metadata; its limits are per connection (caps per client IP, a
connection rate, a handshake deadline and size), and while the enclave is down each client is closed
at once (the vsock connect is bounded by :data:`ENCLAVE_CONNECT_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import grpc

from nitrovault.errors import ConfigError
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc
from nitrovault.transport import AddressMap, Relay, UnixAddress, VsockAddress, parse_address
from parent_app.config import ParentConfig
from parent_app.health import HealthEndpoint
from parent_app.host_services import HostServices
from parent_app.host_sources import (
    CredentialsSource,
    DirectoryModels,
    ImdsCredentials,
    ModelSource,
    S3Models,
    StaticCredentials,
)
from parent_app.supervisor import (
    EnclaveLauncher,
    NitroCliLauncher,
    ProcessLauncher,
    Supervisor,
    SupervisorState,
)

log = logging.getLogger("parent")

#: seconds a relayed client waits for the enclave's vsock port before it is closed (enclave down)
ENCLAVE_CONNECT_TIMEOUT_S = 1.0


def _credentials(config: ParentConfig) -> CredentialsSource:
    kind = config.credentials.get("kind")
    if kind == "static":
        return StaticCredentials(Path(config.credentials["file"]))
    if kind == "imds":
        return ImdsCredentials()
    raise ConfigError(f"unknown credentials kind {kind!r}")


def _models(config: ParentConfig) -> ModelSource:
    kind = config.models.get("kind")
    if kind == "directory":
        return DirectoryModels(Path(config.models["path"]))
    if kind == "s3":
        import boto3

        return S3Models(config.models["bucket"], config.models.get("prefix", ""), boto3.client("s3"))
    raise ConfigError(f"unknown models kind {kind!r}")


def _launcher(config: ParentConfig) -> EnclaveLauncher:  # type: ignore[type-arg]
    kind = config.enclave.get("kind")
    if kind == "process":
        return ProcessLauncher(config.enclave_argv())
    if kind == "nitro-cli":
        return NitroCliLauncher(
            config.enclave["eif"],
            int(config.enclave["cpu_count"]),
            int(config.enclave["memory_mib"]),
            config.enclave_cid,
        )
    raise ConfigError(f"unknown enclave kind {kind!r}")


def public_relay(config: ParentConfig, mapping: AddressMap) -> Relay:
    """The public listener: TCP ``listen`` -> vsock(enclave_cid, inference_port), TLS guard on."""
    return Relay(
        config.listen_address,
        VsockAddress(config.enclave_cid, config.inference_port),
        mapping=mapping,
        max_connections=config.max_connections,
        max_connections_per_source=config.max_connections_per_source,
        connection_rate_per_source=config.connection_rate_per_source,
        connection_burst_per_source=config.connection_burst_per_source,
        idle_timeout=config.idle_timeout_s,
        connect_timeout=ENCLAVE_CONNECT_TIMEOUT_S,
        tls_handshake_timeout=config.handshake_timeout_s,
        max_handshake_bytes=config.max_handshake_bytes,
    )


async def run(config: ParentConfig, *, mapping: AddressMap, stop: asyncio.Event | None = None) -> int:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_sock = run_dir / "host.sock"
    host = HostServices(
        credentials=_credentials(config),
        models=_models(config),
        region=config.region,
        status_file=run_dir / "status.json",
        audit_dir=config.audit_path,
        audit_max_bytes=config.audit_max_bytes,
    )
    host.write_status()
    host_server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    host_pb2_grpc.add_HostServicesServicer_to_server(host, host_server)
    host_server.add_insecure_port(f"unix:{host_sock}")
    public = public_relay(config, mapping)
    relays = [
        public,
        Relay(VsockAddress(3, config.host_services_port), UnixAddress(str(host_sock)), mapping=mapping),
    ]
    if config.kms_proxy_target:
        relays.append(
            Relay(
                VsockAddress(3, config.kms_proxy_port),
                parse_address(config.kms_proxy_target),
                mapping=mapping,
            )
        )
    if config.state_store_proxy_target:  # bytes only: TLS runs from the enclave to the store
        relays.append(
            Relay(
                VsockAddress(3, config.state_store_proxy_port),
                parse_address(config.state_store_proxy_target),
                mapping=mapping,
            )
        )
    health_address = config.health_address
    health = HealthEndpoint(health_address, lambda: host.status.state) if health_address else None

    def on_state(state: SupervisorState) -> None:
        if state in (SupervisorState.BACKOFF, SupervisorState.STARTING) and host.status.state == "SERVING":
            host.mark("RESTARTING", "enclave exited", "supervisor")

    supervisor = Supervisor(_launcher(config), stable_after=config.stable_after_s, on_state=on_state)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervising: asyncio.Task[None] | None = None
    try:
        await host_server.start()
        for relay in relays:
            await relay.start()
        if health is not None:
            await health.start()
            log.info("health endpoint on %s", str(health.bound).removeprefix("tcp:"))
        print(f"parent listening on {str(public.bound).removeprefix('tcp:')}", flush=True)
        supervising = asyncio.create_task(supervisor.run())
        await stop.wait()
    finally:
        if supervising is not None:
            await supervisor.stop()
            supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervising
        if health is not None:
            await health.close()
        for relay in relays:
            await relay.close()
        await host_server.stop(1.0)
        host.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Production entry: ``python -m parent_app /etc/nitrovault/parent.json``."""
    from nitrovault.transport import DIRECT

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        config = ParentConfig.load(args[0] if args else "/etc/nitrovault/parent.json")
        return asyncio.run(run(config, mapping=DIRECT))
    except ConfigError as err:
        print(err.diagnostics(), file=sys.stderr)
        return 2
