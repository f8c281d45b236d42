"""What the shared state store costs and what it buys, side by side with the in-memory ledgers.

A real ``redis-server`` (TLS only, the enclaves' RBAC user: :mod:`nitrovault.local.state_store`) runs on
loopback for the duration of the module, reached the way an enclave reaches it (redis-py's TLS connection
over a socket the route opens; in production the route is vsock to the parent's proxy).

``shared_limits_overhead_us``
    p50 and p99 of one call's limit checks, token verify + quota charge + privacy-budget spend, with the
    shared store (:class:`~nitrovault.state.SharedAdmission`, what the enclave runs per call: one atomic
    script, one round trip) against the in-memory ledgers of the same run. ``value``: the p50 added, in
    µs (target ≤ 300 µs on loopback). The token is a real EdDSA JWT (the verifier's signature cache is
    warm after the first call, as for a client that reuses its token). The tier and budget are too large
    to refuse anything; a refusal (quota or budget) fails the module rather than skewing the figure.
``shared_limits_rps_ratio``
    served calls per second at 32 concurrent clients: the enclave's real gRPC server (in process, on a
    unix socket, plaintext: TLS costs the same on both sides) serving the digits classifier (``Infer`` of
    one row, hardening and Laplace noise with a per-subject budget, so every call charges a quota and
    spends budget) once with the shared store and once with the in-memory ledgers. ``ratio``:
    shared / in memory, the means of three alternating runs each (target ≥ 0.8). Each client has its own
    subject. What it shows: how much of the
    enclave's serving throughput the store's round trip (off the event loop, on a worker thread) keeps.
    ``limits_only_rps`` is the same 32 threads calling only the limit checks (no server): the store's own
    ceiling through one connection pool, next to the in-memory ledgers'. Those two are not alike: the
    in-memory path is pure CPU under one lock per ledger (and the GIL), so its 32 threads run one at a
    time at a few µs a call; the shared path's threads mostly wait on the network (a round trip to the
    store each), and on this 2-core machine the TLS client work, the redis-server process and the GIL
    share two cores. Its ``ratio`` (shared / in memory, typically well under 0.1) says how far the store's
    round trip is from free, not what a served call loses: a served call's own work dwarfs both, which is
    what the headline ratio measures.
``over_admission``
    16 threads, each with its own store client (16 enclaves), race 20 attempts each for one subject whose
    tier allows 100 calls a day. ``value``: admitted minus the quota (target 0). The raw
    ``memory_admitted`` is the same race against 16 in-memory ledgers, one per enclave: what a fleet
    without the store admits.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from safetensors import safe_open

from bench.timing import p50_p99_us
from enclave_app.config import Access, EnclaveConfig, Protection, StateStoreConfig
from enclave_app.models import ModelHandler, load_handler
from enclave_app.outputs import OutputGuard, SealedExtras
from enclave_app.server import SERVICE, EnclaveServer, ServingModel
from nitrovault.access import QuotaLedger, QuotaPolicy, QuotaTiers, TokenVerifier
from nitrovault.envelope.extras import REFERENCE_TENSOR
from nitrovault.errors import QuotaExceededError
from nitrovault.local.homes import free_port
from nitrovault.local.nsm import make_local_nsm
from nitrovault.local.state_store import HOST, USERNAME, LocalStateStore, redis_server_binary
from nitrovault.nsm import Nsm
from nitrovault.owner.issuer import TokenIssuer
from nitrovault.protection import BudgetPolicy, PrivacyBudget
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.tensors import from_numpy
from nitrovault.state import SharedAdmission, SharedQuotaLedger, StateStore, StoreSettings

CALLS = 2000
THREADS = 32
RPS_CALLS = 300  #: per thread, limit checks only
SERVED_CALLS = 40  #: per client, through the server
ROUNDS = 3  #: alternating served runs per side
RACERS, ATTEMPTS, QUOTA = 16, 20, 100

OPEN = QuotaTiers({"open": QuotaPolicy(rate_per_s=1e9, burst=10**9)}, default="open")
BUDGET = BudgetPolicy(epsilon=1e12)
Check = Callable[[str], object]


def _percentiles(fn: Callable[[], object], n: int = CALLS) -> tuple[float, float]:
    return p50_p99_us(fn, n, warmup=100)


def _client(server: LocalStateStore, port: int, namespace: str) -> StateStore:
    settings = StoreSettings(host=HOST, ca_bundle=server.ca_pem.decode(), username=USERNAME,
                             namespace=namespace, timeout_s=2.0)
    return StateStore.connect(settings, server.password,
                              route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))


def _in_memory(verifier: TokenVerifier, token: str) -> Check:
    ledger, budget = QuotaLedger(OPEN), PrivacyBudget(BUDGET)

    def check(subject: str) -> object:
        principal = verifier.authenticate(token)
        ledger.charge(subject or principal.subject, principal.tier, 1)
        return budget.spend(subject or principal.subject, 0.5)

    return check


def _shared(verifier: TokenVerifier, token: str, store: StateStore) -> Check:
    """What the enclave does per call with the store: one admission (quota and budget, one round trip)."""
    admission = SharedAdmission(store, OPEN, BUDGET)

    def check(subject: str) -> object:
        principal = verifier.authenticate(token)
        admitted = admission.admit(subject or principal.subject, principal.tier, 1, privacy=(0.5, 0.0),
                                   soft=True)
        if admitted.budget_refused:  # soft: a refused spend does not raise; it must not pass unseen either
            raise AssertionError("the bench's privacy budget refused a spend")
        return admitted

    return check


class _Server:
    """The enclave's gRPC server on a unix socket, on an event loop of its own (a daemon thread)."""

    def __init__(self, config: EnclaveConfig, socket_path: str, handler: ModelHandler,
                 store: StateStore | None, nsm: Nsm) -> None:
        self.target = f"unix:{socket_path}"
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def make() -> EnclaveServer:
            server = EnclaveServer(config, nsm, socket_path)
            await server.start()
            outputs = OutputGuard.for_handler(config.protection, SealedExtras(), handler, store=store)
            await server.serve(ServingModel(handler, "cd" * 32, outputs, store))
            return server

        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _served_rps(target: str, issuer: TokenIssuer, row: np.ndarray) -> float:
    request = pb.InferRequest(inputs=pb.Tensors(tensors=[from_numpy("x", row)]))
    def client(i: int, start: threading.Barrier) -> None:
        metadata = (("authorization", f"Bearer {issuer.issue(f'client-{i}', ['infer:*'], 3600)}"),)
        # a connection per client, as separate callers have (one shared connection caps streams at 32)
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            infer = channel.unary_unary(f"/{SERVICE}/Infer",
                                        request_serializer=pb.InferRequest.SerializeToString,
                                        response_deserializer=pb.InferResponse.FromString)
            infer(request, metadata=metadata, timeout=60)  # warm
            start.wait()
            for _ in range(SERVED_CALLS):
                infer(request, metadata=metadata, timeout=60)

    return THREADS * SERVED_CALLS / _together(THREADS, client)


def _together(n: int, work: Callable[[int, threading.Barrier], object]) -> float:
    """Run ``work(i, start)`` on ``n`` threads; each waits on ``start`` when ready to go. Seconds from
    the moment all are released until the last one ends."""
    start = threading.Barrier(n + 1)
    threads = [threading.Thread(target=work, args=(i, start)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - began


@dataclass(frozen=True)
class Served:
    """Served calls per second of each run, per side, and the store's CPU share while shared ran."""

    memory: list[float]
    shared: list[float]
    store_cpu_share: float


def _serving_ratio(server_store: LocalStateStore, store: StateStore, issuer: TokenIssuer, tmp: Path,
                   store_pid: int) -> Served:
    """Served rps with and without the store, alternating (memory, shared) ``ROUNDS`` times so that
    neither side always runs first on a warming machine; the means, and each run."""
    from nitrovault.local.digits import write_digits_weights

    weights = write_digits_weights(tmp / "digits.safetensors")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != REFERENCE_TENSOR}  # noqa: SIM118
    handler = load_handler("generic:mlp-classifier", tensors, metadata)
    access = Access(issuer="https://issuer.bench", audience="nitrovault", jwks=issuer.jwks,
                    tiers={"default": {"rate_per_s": 1e9, "burst": 10**9}})
    protection = Protection.from_mapping({
        "hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
        "privacy": {"mechanism": {"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0},
                    "budget": {"epsilon": 1e12}}})
    memory_config = EnclaveConfig(
        model_id="digits", model_version="1", handler="generic:mlp-classifier",
        kms_key_arn="arn:aws:kms:us-east-1:111122223333:key/x", region="us-east-1",
        encryption_context={"model": "digits", "version": "1"}, sealed_digest="cd" * 32,
        kms_ca_bundle=server_store.ca_pem.decode(), access=access, protection=protection)
    shared_config = replace(memory_config, state_store=StateStoreConfig(
        host=HOST, ca_bundle=server_store.ca_pem.decode(), username=USERNAME))
    nsm = make_local_nsm(tmp / "pki", {0: bytes(48)})
    row = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    runs: dict[str, list[float]] = {"memory": [], "shared": []}
    cpu_share: list[float] = []
    sides = [("memory", memory_config, None), ("shared", shared_config, store)]
    for name, config, with_store in sides * ROUNDS:
        server = _Server(config, str(tmp / f"{name}-{len(runs[name])}.sock"), handler, with_store, nsm)
        try:
            cpu, wall = _cpu_s(store_pid), time.perf_counter()
            runs[name].append(_served_rps(server.target, issuer, row))
            if with_store is not None:
                cpu_share.append((_cpu_s(store_pid) - cpu) / (time.perf_counter() - wall))
        finally:
            server.close()
    return Served(runs["memory"], runs["shared"], statistics.mean(cpu_share))


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: the store's share of this machine's cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rps(check: Check) -> float:
    def worker(i: int, start: threading.Barrier) -> None:
        start.wait()
        for _ in range(RPS_CALLS):
            check(f"rps-{i}")

    return THREADS * RPS_CALLS / _together(THREADS, worker)


def _race(ledgers: list[QuotaLedger | SharedQuotaLedger]) -> int:
    admitted: list[int] = []

    def racer(i: int, start: threading.Barrier) -> None:
        start.wait()
        for _ in range(ATTEMPTS):
            try:
                ledgers[i].charge("racer", None, 1)
                admitted.append(1)
            except QuotaExceededError:
                pass

    _together(len(ledgers), racer)
    return len(admitted)


def run() -> Iterator[dict[str, object]]:
    if redis_server_binary() is None:
        raise RuntimeError("bench_shared_limits needs redis-server (or valkey-server) on PATH: "
                           "`make system` installs Debian's redis-server")
    issuer = TokenIssuer(ed25519.Ed25519PrivateKey.generate(), "k1", "https://issuer.bench", "nitrovault")
    verifier = TokenVerifier("https://issuer.bench", "nitrovault", issuer.jwks)
    token = issuer.issue("bench", ["embed:*"], 3600)
    with tempfile.TemporaryDirectory(prefix="nv-bench-store-") as tmp:
        server = LocalStateStore.ensure(Path(tmp) / "server", Path(tmp) / "password")
        port = free_port()
        with (Path(tmp) / "server.log").open("ab") as log:
            proc = server.start(port=port, log=log)
        clients: list[StateStore] = []
        try:
            store = _client(server, port, "bench")
            clients.append(store)
            memory, shared = _in_memory(verifier, token), _shared(verifier, token, store)
            memory_p50, memory_p99 = _percentiles(lambda: memory(""))
            shared_p50, shared_p99 = _percentiles(lambda: shared(""))
            yield {
                "name": "shared_limits_overhead_us", "value": round(shared_p50 - memory_p50, 1),
                "memory_p50_us": round(memory_p50, 1), "memory_p99_us": round(memory_p99, 1),
                "shared_p50_us": round(shared_p50, 1), "shared_p99_us": round(shared_p99, 1),
                "target_us": 300, "calls": CALLS, "checks": "token + quota + privacy budget",
            }

            served = _serving_ratio(server, store, issuer, Path(tmp), proc.pid)
            memory_rps, shared_rps = _rps(memory), _rps(shared)
            memory_mean, shared_mean = statistics.mean(served.memory), statistics.mean(served.shared)
            yield {
                "name": "shared_limits_rps_ratio", "ratio": round(shared_mean / memory_mean, 3),
                "memory_rps": round(memory_mean), "shared_rps": round(shared_mean), "target": 0.8,
                "clients": THREADS, "calls_per_client": SERVED_CALLS,
                "call": "Infer, 1 row, digits MLP, reverse_sigmoid + Laplace with a budget",
                "limits_only_rps": {"memory": round(memory_rps), "shared": round(shared_rps),
                                    "ratio": round(shared_rps / memory_rps, 3),
                                    "calls_per_thread": RPS_CALLS},
                # the local redis-server shares this machine's cores (ElastiCache has its own nodes)
                "store_cpu_cores_while_shared": round(served.store_cpu_share, 3),
                "memory_runs_rps": [round(r) for r in served.memory],
                "shared_runs_rps": [round(r) for r in served.shared],
                "cores": os.cpu_count(),
            }

            daily = QuotaTiers({"d": QuotaPolicy(rate_per_s=1e9, burst=10**9, daily_requests=QUOTA)},
                               default="d")
            enclaves = [_client(server, port, "race") for _ in range(RACERS)]
            clients.extend(enclaves)
            admitted = _race([SharedQuotaLedger(c, daily) for c in enclaves])
            alone = _race([QuotaLedger(daily) for _ in range(RACERS)])
            yield {
                "name": "over_admission", "value": admitted - QUOTA, "admitted": admitted, "quota": QUOTA,
                "attempts": RACERS * ATTEMPTS, "enclaves": RACERS, "memory_admitted": alone, "target": 0,
            }
        finally:
            for client in clients:
                client.close()
            proc.terminate()
            proc.wait(10)
