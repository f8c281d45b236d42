"""The enclave's composition: relays, gRPC server, boot, serve until told to stop.

``run`` is called by a composition root that picks how vsock is reached and which NSM transport is used:
``python -m enclave_app`` in production (real ``AF_VSOCK``, ``/dev/nsm``), the local stack's runner
(``nitrovault.local.enclave``) locally (unix sockets, the local NSM service). Everything below that choice
is the same code.

In-enclave plumbing (relays: :class:`nitrovault.transport.Relay`)::

    vsock(enclave_cid, inference)  ──► unix RUN/grpc.sock       (the gRPC server, TLS ends here)
    unix RUN/host.sock             ──► vsock(3, host_services)  (credentials, sealed model, status, audit)
    tcp 127.0.0.1:kms_forwarder    ──► vsock(3, kms_proxy)      (boto3 → KMS, TLS end to end)
    redis-py (no listener)         ──► vsock(3, state_store)    (the shared state store, TLS end to end)

The route to KMS: the enclave starts with its loopback interface down, so ``run`` brings ``lo`` up first
(:func:`nitrovault.transport.loopback.ensure_loopback_up`, an ioctl: the image has no ``ip``). boto3 then
talks to the region's real endpoint, ``https://kms.<region>.amazonaws.com``, with the forwarder on
127.0.0.1 as its HTTPS proxy: an HTTP ``CONNECT`` tunnel (:class:`nitrovault.transport.ConnectForwarder`)
that admits only that host and port and splices the bytes to vsock ``(3, kms_proxy)``, where the parent's
``vsock-proxy`` relays them to KMS. No DNS, no ``/etc/hosts``: the CONNECT line names the host, and TLS
(SNI and certificate checked against the measured ``kms_ca_bundle``, nothing from the environment) runs
from boto3 to KMS, so the parent relays ciphertext it can neither read nor answer.

Access is fail closed: a measured config without a token issuer makes the enclave refuse to boot (FAILED,
step ``config``). The boot's receipt/audit key is made from NSM randomness before boot, so the document
KMS sees already binds it. The gRPC server starts only after boot, with the TLS identity sealed with
the model: before then the inference port refuses connections (the parent's relay answers promptly),
and no byte of a request is ever served in plaintext. On SIGTERM/SIGINT the server stops taking calls,
the audit log gets its final signed checkpoint and the enclave waits (bounded) for the parent to store
it before exiting. The parent's DRAIN (host ``Control`` stream, opened once serving) does the same with
its deadline as the grace for in-flight calls, reporting DRAINING and then STOPPED once the log is
stored. A ``WeightsIntegrityError`` (the dynamic weights' in-memory ciphertext failed to authenticate)
stops serving at once: FAILED, exit 3, and the parent's supervisor boots a fresh enclave.

Aggregate metrics (``enclave_app.metrics``) go to the parent every :data:`METRICS_INTERVAL_S` seconds
and once more at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import torch

from enclave_app.boot import BootFailure, boot
from enclave_app.config import EnclaveConfig
from enclave_app.host import AuditShipper, HostClient
from enclave_app.metrics import MetricsReporter
from enclave_app.server import EnclaveServer, InferenceService, ServingModel
from nitrovault.audit import AuditStatus
from nitrovault.errors import NetworkSetupError
from nitrovault.kms import AwsCredentials, KmsClient, kms_client_from_env
from nitrovault.nsm import Nsm, NsmTransport
from nitrovault.state import StateStore
from nitrovault.transport import (
    AddressMap,
    ConnectForwarder,
    Relay,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    open_socket,
)
from nitrovault.transport.loopback import ensure_loopback_up
from nitrovault.transport.vsock import local_cid

log = logging.getLogger("enclave")

#: seconds between metrics reports to the parent
METRICS_INTERVAL_S = 5.0
#: the longest grace a DRAIN can ask for in-flight calls (a parent cannot hold the enclave open forever)
MAX_DRAIN_S = 300.0


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so cold start includes interpreter and import time."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _say(event: str, **fields: object) -> None:
    """One JSON line on stdout per boot event (the parent logs it; nothing secret is ever in it)."""
    print(json.dumps({"event": event, **fields}), flush=True)


def _size_threads(config: EnclaveConfig) -> None:
    """torch's threads sized to the enclave's vCPUs (``batching`` in the measured config): inter-op
    threads once for the process, intra-op threads for this thread (the model workers set their own)."""
    vcpus = os.cpu_count() or 1
    workers, threads = config.model_threads(vcpus)
    try:
        torch.set_num_interop_threads(config.batching.interop_threads)
    except RuntimeError:  # already fixed (torch ran parallel work before): keep torch's choice
        log.warning("torch inter-op threads were already fixed; keeping %d", torch.get_num_interop_threads())
    torch.set_num_threads(threads)
    _say("threads", vcpus=vcpus, workers=workers, torch_threads=threads,
         interop_threads=torch.get_num_interop_threads())


async def run(
    config: EnclaveConfig, *, mapping: AddressMap, nsm_transport: NsmTransport, run_dir: Path,
    enclave_cid: int | None = None,
) -> int:
    """Boot and serve until SIGTERM/SIGINT, the parent's DRAIN, or a fatal serving error.

    ``enclave_cid``: this enclave's vsock CID as the composition root found it (the kernel's answer in
    production, so one measured image runs under any CID; ``ports.enclave_cid`` when ``None``)."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in ("grpc.sock", "host.sock", "model.sealed"):  # left by a killed predecessor
        with contextlib.suppress(FileNotFoundError):
            (run_dir / stale).unlink()
    ports = config.ports
    cid = enclave_cid if enclave_cid is not None else ports.enclave_cid
    grpc_sock = run_dir / "grpc.sock"
    host_sock = run_dir / "host.sock"
    relays = [
        Relay(VsockAddress(cid, ports.inference), UnixAddress(str(grpc_sock)), mapping=mapping),
        Relay(
            UnixAddress(str(host_sock)), VsockAddress(ports.parent_cid, ports.host_services), mapping=mapping
        ),
    ]
    kms_url = urlsplit(config.kms_endpoint)
    forwarder = ConnectForwarder(
        TcpAddress("127.0.0.1", config.kms_forwarder_port),
        VsockAddress(ports.parent_cid, ports.kms_proxy),
        allowed=[(str(kms_url.hostname), kms_url.port or 443)],
        mapping=mapping,
    )
    nsm = Nsm(nsm_transport)
    host = HostClient(
        f"unix:{host_sock}", download_dir=run_dir, max_model_bytes=config.limits.max_model_bytes,
        enclave_cid=cid,
    )

    def on_audit_change(down: bool, reason: str) -> None:
        _say("audit-degraded" if down else "audit-recovered", reason=reason)
        host.report("DEGRADED" if down else "SERVING", reason=reason, step="audit")

    reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="withheld-report")

    def on_withheld(reason: str | None) -> None:
        """Announce it on the console and to the parent (its log, for operators; the CDK app's alarm reads
        the ``audit_withheld`` gauge); the report is a blocking call and this runs on the request path,
        so it goes from the reporter thread."""
        if reason is None:
            _say("audit-stored", detail="the parent stores the audit log again: serving protected calls")
            report = ("SERVING", "audit log stored again", "audit")
        else:
            _say("audit-withheld", reason=reason)
            report = ("DEGRADED", reason, "audit-withheld")
        state, why, step = report
        reporter.submit(host.report, state, reason=why, step=step)  # one thread: reports stay in order

    audit = config.audit
    shipper = AuditShipper(host.audit_append, on_change=on_audit_change, on_withheld=on_withheld,
                           max_withheld=audit.max_withheld_records, max_withheld_s=audit.max_withheld_s)
    _size_threads(config)
    service = InferenceService(config, nsm, audit_sink=shipper)
    server: EnclaveServer | None = None
    protections = service.protections
    protections.audit_withheld = shipper.withheld
    shipper.start(protections.audit)
    service.metrics.gauge("audit_backlog", shipper.backlog)
    service.metrics.gauge("audit_withheld", lambda: 0.0 if shipper.withheld_reason is None else 1.0)
    metrics = MetricsReporter(service.metrics, host.report_metrics, boot_id=protections.audit.boot_id,
                              enclave_cid=cid, interval_s=METRICS_INTERVAL_S)
    metrics.start()
    for relay in relays:
        await relay.start()
    ca_bundle = config.kms_ca_bundle.encode()

    def kms_factory(credentials: AwsCredentials) -> KmsClient:
        return KmsClient(kms_client_from_env(
            config.region, endpoint_url=config.kms_endpoint, credentials=credentials,
            ca_bundle=ca_bundle, proxy=config.kms_proxy_url,
        ))

    store_factory: Callable[[str], StateStore] | None = None
    if config.state_store is not None:
        settings = config.state_store.settings(config.model_id)
        store_address = VsockAddress(ports.parent_cid, ports.state_store)

        def route() -> socket.socket:
            return open_socket(store_address, mapping, timeout=settings.timeout_s)

        def store_factory(password: str) -> StateStore:
            return StateStore.connect(settings, password, route=route)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ending = _Ending()

    def on_drain(deadline_s: float) -> None:  # from the control thread
        loop.call_soon_threadsafe(ending.drain, deadline_s, stop)

    def on_fatal(reason: str) -> None:  # from the event loop or a worker thread
        loop.call_soon_threadsafe(ending.fail, reason, stop)

    service.on_fatal = on_fatal
    control_stopped = threading.Event()
    control: threading.Thread | None = None
    exit_code = 0
    store: StateStore | None = None
    try:
        if not config.access.enabled:
            reason = "no token issuer in the measured config: refusing to serve anyone"
            _say("boot-failed", step="config", reason=reason)
            await asyncio.to_thread(host.report, "FAILED", reason=reason, step="config")
            return 3
        try:
            if ensure_loopback_up():
                _say("network", detail="brought the loopback interface up")
            await forwarder.start()
        except (NetworkSetupError, OSError) as err:
            reason = f"cannot set up the route to KMS: {type(err).__name__}: {err}"
            _say("boot-failed", step="network", reason=reason)
            await asyncio.to_thread(host.report, "FAILED", reason=reason, step="network")
            return 3
        _say("booting", model=config.model_id, version=config.model_version,
             receipt_key_id=protections.key_id, audit_boot=protections.audit.boot_id)
        await asyncio.to_thread(host.report, "BOOTING", step="boot")
        try:
            result = await asyncio.to_thread(
                boot, config, host=host, nsm=nsm, kms_factory=kms_factory, user_data=service.user_data,
                store_factory=store_factory,
            )
        except BootFailure as failure:
            _say("boot-failed", step=failure.step, reason=failure.reason)
            await asyncio.to_thread(host.report, "FAILED", reason=failure.reason, step=failure.step)
            return 3
        server = EnclaveServer(config, nsm, str(grpc_sock), service=service, tls=result.tls)
        await server.start()
        store = result.store
        await server.serve(ServingModel(result.handler, result.sealed_digest, result.outputs, store))
        timings = result.timings.as_dict()
        age = process_age_s()
        if age is not None:
            timings["since_process_start_s"] = round(age, 4)
        _say("serving", sealed_digest=result.sealed_digest, timings=timings,
             tls_spki_sha256=result.tls.spki_sha256.hex())
        await asyncio.to_thread(host.report, "SERVING", reason=json.dumps(timings), step="serving")
        control = threading.Thread(target=host.watch_control, args=(on_drain, control_stopped),
                                   name="control", daemon=True)
        control.start()
        await stop.wait()
        if ending.fatal is not None:
            exit_code = 3
    finally:
        control_stopped.set()
        host.stop_control()
        if ending.fatal is not None:
            _say("stopping", reason=ending.fatal)
            await asyncio.to_thread(host.report, "FAILED", reason=f"stopped serving: {ending.fatal}",
                                    step=ending.fatal)
        elif ending.draining:
            _say("draining", deadline_s=ending.grace)
            await asyncio.to_thread(host.report, "DRAINING", reason="told to drain", step="drain")
        if server is not None:
            await server.stop(ending.grace)  # in-flight calls get the grace, then are cancelled
        else:
            service.close()
        stored = await asyncio.to_thread(_close_audit, protections.close, protections.audit.flush, shipper)
        metrics.stop()
        if ending.draining and ending.fatal is None:
            _say("drained", audit_stored=stored)
            await asyncio.to_thread(host.report, "STOPPED" if stored else "DEGRADED",
                                    reason="drained" if stored else "drained; audit log not fully stored",
                                    step="drain")
        for relay in relays:
            await relay.close()
        await forwarder.close()
        reporter.shutdown(wait=False)
        if store is not None:
            store.close()
        host.close()
    return exit_code


class _Ending:
    """How serving ends: SIGTERM (``grace`` 2 s), the parent's DRAIN (its deadline) or a fatal error."""

    def __init__(self) -> None:
        self.grace = 2.0
        self.draining = False
        self.fatal: str | None = None

    def drain(self, deadline_s: float, stop: asyncio.Event) -> None:
        if not self.draining:
            self.draining = True
            self.grace = min(max(deadline_s, 0.0), MAX_DRAIN_S) if math.isfinite(deadline_s) else 2.0
        stop.set()

    def fail(self, reason: str, stop: asyncio.Event) -> None:
        if self.fatal is None:
            self.fatal = reason
            self.grace = 0.0  # nothing more is served from tampered memory
        stop.set()


def _close_audit(close: Callable[[], object], flush: Callable[[], AuditStatus], shipper: AuditShipper,
                 timeout: float = 5.0) -> bool:
    """Final checkpoint, then wait (bounded) until the parent stored everything; whether it did."""
    close()
    deadline = time.monotonic() + timeout
    stored = False
    while time.monotonic() < deadline:
        status = flush()
        if shipper.drain(0.5) and not status.degraded:
            stored = True
            break
    else:
        log.warning("audit log not fully delivered at shutdown (%d entries buffered)", flush().buffered)
    shipper.stop()
    return stored


def main(argv: list[str] | None = None) -> int:
    """Production entry: ``python -m enclave_app /etc/nitrovault/enclave.json`` (inside the image)."""
    from nitrovault.nsm import DeviceTransport
    from nitrovault.transport import DIRECT

    args = sys.argv[1:] if argv is None else argv
    config_path = args[0] if args else "/etc/nitrovault/enclave.json"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = EnclaveConfig.load(config_path)
    return asyncio.run(
        run(config, mapping=DIRECT, nsm_transport=DeviceTransport(), run_dir=Path("/run/nitrovault"),
            enclave_cid=local_cid())
    )
