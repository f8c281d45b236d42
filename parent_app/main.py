"""The parent's composition: the public TCP relay, the health endpoint, host services, enclave supervision.

``run`` is called by a composition root that picks how vsock is reached: ``python -m parent_app`` in
production (real ``AF_VSOCK``), the local stack's runner (``nitrovault.local.parent``) locally. Plumbing::

    tcp listen ──► relay (layer 4, TLS record headers checked) ──► vsock(a serving enclave, inference)
                                                          (TLS 1.3 + HTTP/2 end inside the enclave)
    tcp health_listen ──► GET /health: 200 while an enclave reports SERVING, else 503
    tcp metrics_listen ──► GET /metrics: Prometheus (parent_app/metrics.py)
    vsock(3, host_services) ──► relay ──► unix RUN/host.sock (HostServices gRPC)
    vsock(3, kms_proxy) ──► relay ──► KMS (local only; AWS's vsock-proxy in production)
    vsock(3, state_store) ──► relay ──► the shared state store (local only; a second vsock-proxy in
                                        production); the enclave's TLS and AUTH pass through unread

The parent is hostile by design: on the public path it only copies ciphertext. It terminates no TLS,
parses no HTTP/2 and sees no payload or metadata; its limits are per connection (caps per client IP, a
connection rate, a handshake deadline and size), and while the enclave is down each client is closed
at once (the vsock connect is bounded by :data:`ENCLAVE_CONNECT_TIMEOUT_S`).

Several enclaves (``enclave.count``, CIDs ``enclave_cid`` upwards): each has its own supervisor and
status; the relay spreads new clients round robin across those that take calls (:class:`EnclavePool`),
so one that restarts only takes its own clients down. SIGTERM or SIGINT drains (:func:`_drain`): the
public port closes, every enclave is told to drain over its control stream and gets ``drain_timeout_s``
for calls in flight and :data:`AUDIT_FLUSH_S` more for its final audit checkpoint, and only then is what
is left stopped; the host services stay up until the end so the audit log arrives whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from nitrovault.errors import ConfigError
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2_grpc
from nitrovault.transport import Address, AddressMap, Relay, UnixAddress, VsockAddress, parse_address
from parent_app.config import ParentConfig
from parent_app.health import HealthEndpoint
from parent_app.host_services import TAKES_CALLS, HostServices
from parent_app.host_sources import (
    CredentialsSource,
    DirectoryModels,
    ImdsCredentials,
    ModelSource,
    S3Models,
    StaticCredentials,
)
from parent_app.metrics import EnclaveView, ParentMetrics
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


def _launcher(config: ParentConfig, cid: int) -> EnclaveLauncher:  # type: ignore[type-arg]
    """The launcher of the enclave with vsock CID ``cid`` (a process argv may name it as ``{cid}``)."""
    kind = config.enclave.get("kind")
    if kind == "process":
        argv = list(config.enclave_argv())
        if config.enclave_count > 1 and not any("{cid}" in a for a in argv):
            raise ConfigError("enclave.argv must name {cid} when enclave.count > 1 (each needs its own)")
        return ProcessLauncher([a.replace("{cid}", str(cid)) for a in argv])
    if kind == "nitro-cli":
        return NitroCliLauncher(
            config.enclave["eif"],
            int(config.enclave["cpu_count"]),
            int(config.enclave["memory_mib"]),
            cid,
        )
    raise ConfigError(f"unknown enclave kind {kind!r}")


class EnclavePool:
    """Which enclave a new client goes to: the one that takes calls and holds the fewest relayed
    connections now (clients keep HTTP/2 connections open, so connections are the load a layer-4 relay
    can see), ties in turn; ``None`` when none takes calls."""

    def __init__(self, host: HostServices, port: int) -> None:
        self._host = host
        self._port = port
        self._turn = 0

    def choose(self, active: Mapping[Address, int]) -> VsockAddress | None:
        serving = [VsockAddress(cid, self._port) for cid in self._host.serving()]
        if not serving:
            return None
        fewest = min(active.get(a, 0) for a in serving)
        tied = [a for a in serving if active.get(a, 0) == fewest]
        self._turn += 1
        return tied[self._turn % len(tied)]


def public_relay(config: ParentConfig, mapping: AddressMap, pool: EnclavePool | None = None) -> Relay:
    """The public listener: TCP ``listen`` -> vsock(an enclave, inference_port), TLS guard on."""
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
        choose=None if pool is None else pool.choose,
    )


async def run(config: ParentConfig, *, mapping: AddressMap, stop: asyncio.Event | None = None) -> int:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_sock = run_dir / "host.sock"
    metrics = ParentMetrics()
    host = HostServices(
        credentials=_credentials(config),
        models=_models(config),
        region=config.region,
        status_file=run_dir / "status.json",
        audit_dir=config.audit_path,
        audit_max_bytes=config.audit_max_bytes,
        cids=config.enclave_cids,
        on_call=metrics.host_call,
        on_metrics=metrics.enclave_report,
    )
    host.write_status()
    host_server = grpc.aio.server(options=[("grpc.max_send_message_length", 8 << 20)])
    host_pb2_grpc.add_HostServicesServicer_to_server(host, host_server)
    host_server.add_insecure_port(f"unix:{host_sock}")
    public = public_relay(config, mapping, EnclavePool(host, config.inference_port))
    relays = {
        "public": public,
        "host-services": Relay(VsockAddress(3, config.host_services_port), UnixAddress(str(host_sock)),
                               mapping=mapping),
    }
    if config.kms_proxy_target:
        relays["kms"] = Relay(
            VsockAddress(3, config.kms_proxy_port), parse_address(config.kms_proxy_target), mapping=mapping
        )
    if config.state_store_proxy_target:  # bytes only: TLS runs from the enclave to the store
        relays["state-store"] = Relay(
            VsockAddress(3, config.state_store_proxy_port),
            parse_address(config.state_store_proxy_target),
            mapping=mapping,
        )
    for name, relay in relays.items():
        metrics.relay(name, lambda relay=relay: relay.stats)  # type: ignore[misc]
    draining = False

    def health_state() -> str:
        return "DRAINING" if draining else host.status.state

    health_address = config.health_address
    health = HealthEndpoint(health_address, health_state) if health_address else None

    def on_state(cid: int) -> Callable[[SupervisorState], None]:
        def changed(state: SupervisorState) -> None:
            if state in (SupervisorState.BACKOFF, SupervisorState.STARTING) and not draining \
                    and host.enclaves[cid].state in TAKES_CALLS:
                host.mark("RESTARTING", "enclave exited", "supervisor", cid=cid)
        return changed

    supervisors = {
        cid: Supervisor(_launcher(config, cid), stable_after=config.stable_after_s, on_state=on_state(cid))
        for cid in config.enclave_cids
    }
    metrics.enclaves(lambda: {
        cid: EnclaveView(host.enclaves[cid].state, sup.restarts, host.enclaves[cid].boots)
        for cid, sup in supervisors.items()
    })
    metrics.draining(lambda: draining)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervising: list[asyncio.Task[None]] = []
    try:
        await host_server.start()
        for relay in relays.values():
            await relay.start()
        if health is not None:
            await health.start()
            log.info("health endpoint on %s", str(health.bound).removeprefix("tcp:"))
        if config.metrics_address is not None:
            port = await asyncio.to_thread(metrics.serve, config.metrics_address)
            print(f"parent metrics on {config.metrics_address.host}:{port}", flush=True)
        print(f"parent listening on {str(public.bound).removeprefix('tcp:')}", flush=True)
        supervising = [asyncio.create_task(sup.run()) for sup in supervisors.values()]
        await stop.wait()
    finally:
        draining = True
        if supervising:
            await _drain(config, host, public, supervisors)
        for task in supervising:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if health is not None:
            await health.close()
        for relay in relays.values():
            await relay.close()
        await host_server.stop(1.0)
        await asyncio.to_thread(metrics.close)
        host.close()
    return 0


#: seconds an enclave gets past the drain deadline to write its final audit checkpoint and exit
AUDIT_FLUSH_S = 10.0


async def _drain(config: ParentConfig, host: HostServices, public: Relay,
                 supervisors: Mapping[int, Supervisor]) -> None:
    """Graceful stop (SIGTERM): take no new client, tell every enclave to drain (its in-flight calls get
    ``drain_timeout_s``, then it writes its final audit checkpoint, flushes the log to us and exits), wait
    for them, bounded, and stop what is left. Host services stay up throughout, so the log arrives."""
    public.stop_accepting()
    log.warning("draining: no new connections; enclaves get %.0f s for calls in flight",
                config.drain_timeout_s)

    async def one(cid: int, supervisor: Supervisor) -> None:
        told = host.drain(cid, config.drain_timeout_s)
        bound = config.drain_timeout_s + AUDIT_FLUSH_S if told else 0.0
        ended = await supervisor.drain(bound)
        log.warning("enclave %d %s", cid, "drained" if ended and told else "stopped")

    await asyncio.gather(*(one(cid, sup) for cid, sup in supervisors.items()))
    await public.wait_idle(1.0)


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
