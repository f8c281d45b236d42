"""What the parent's layer-4 relay and the enclave's TLS cost (``python -m bench.run relay``).

The parent relays TCP bytes to the enclave, where TLS ends (``docs/confidential-serving.md``). Here an
enclave-like server (a ``grpc.aio`` server, as in the enclave, with a one-line unary echo handler) and the
relay (:class:`nitrovault.transport.Relay` with the parent's public-listener defaults from
:class:`parent_app.config.ParentConfig`: TLS handshake guard on, per-source caps) each run in their **own
process**, started from this file (``python -m bench.bench_relay server|relay``), as deployed: in one
interpreter the client's threads would fight the relay's and the server's for the GIL and measure that.
The server listens on two unix sockets: one TLS (a fresh :class:`~nitrovault.identity.TlsIdentity`,
self-signed, ECDSA P-256; clients pin it and set ``grpc.ssl_target_name_override``), one plaintext.
Calls carry a 64-byte payload.

* ``relay_added_latency_us``: sequential calls, one by one in turn straight to the TLS socket, through
  the relay (TCP -> relay -> unix socket) and through ``socat TCP-LISTEN:..,fork,reuseaddr
  UNIX-CONNECT:..`` (the same TLS end to end: the relays only see ciphertext). p50 and p99 per round of
  ``LATENCY_CALLS`` triples, median over ``ROUNDS`` rounds. **Headline** ``value``: our added p50 in µs
  (relayed minus direct), target <= 300; ``ratio`` is ours over socat's added p50 (null without socat,
  whose figures are then null with ``socat_missing`` saying why). ``relay_cpu_us_per_call`` (and
  socat's) is the relay process's CPU time per call (``/proc/*/task/*/schedstat``).
* ``relay_vs_direct_rps``: ``CONCURRENCY`` client threads, each with its **own channel and connection**
  (a local subchannel pool, so gRPC does not share one connection between them), each issuing
  ``RPS_CALLS_PER_WORKER`` unary calls: a fixed count, not a fixed time. Short batches direct, relayed,
  plaintext and socat run in turn (the order rotated each round), ``RPS_ROUNDS`` rounds. **Headline**
  ``ratio`` = the median over rounds of relayed rps / direct rps *of the same round* (other processes'
  load drifts between rounds; a pair within a round sees about the same), target >= 0.9.
  ``cpu_bound_ratio`` = direct CPU per call / relayed CPU per call, client + server + relay: what the rps
  ratio is on a CPU-bound machine, and far less disturbed by other load than rps.
* ``confidential_vs_plaintext_rps``: from the same batches: the server's TLS socket against its
  plaintext one, both direct. ``ratio`` = the paired median of TLS rps / plaintext rps.
* ``first_call_ms``: a fresh :class:`~nitrovault.client.NitrovaultClient` (TLS probe, pinned channel,
  ``Attest`` with a nonce, chain + PCR + TLS-key binding checks) and its first ``Info`` call (token
  checked) against warm ``Info`` calls on an established client. The server is the real
  :class:`enclave_app.server.EnclaveServer` with TLS and the local NSM over a throwaway PKI, serving a
  tiny MLP; it runs **in this process** on an event-loop thread (the figure is dominated by crypto and
  round trips, not by the GIL). ``value`` = first-call ms (median of ``FRESH_CLIENTS``), ``ratio`` =
  first over warm; ``verify_ms`` is steps 1-4 (``connect()``), ``verify_parts_ms`` times a TLS probe, an
  ``Attest`` round trip and ``verify_document`` each on its own (the rest is the pinned channel's own TLS
  handshake and the binding check).

This machine shares its few cores between the client, the relay and the server (and whatever else runs);
in production the enclave has its own vCPUs, so the relay's CPU does not come out of the server's. The
throughput figures here are therefore a lower bound of the relayed / direct ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
METHOD = "/bench.Echo/Unary"
PAYLOAD = bytes(range(64))
SERVER_NAME = "enclave.bench.internal"
LATENCY_CALLS = 1500
WARMUP = 200
ROUNDS = 3
RPS_ROUNDS = 30
CONCURRENCY = 16
RPS_CALLS_PER_WORKER = 25
FRESH_CLIENTS = 15
WARM_CALLS = 100


# -- the two other processes ------------------------------------------------------------------------------


def _serve(tls_socket: str, plain_socket: str, key: Path, cert: Path) -> None:
    """The enclave-like server: a ``grpc.aio`` echo on a TLS and a plaintext unix socket, until SIGTERM."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        server.add_secure_port(f"unix:{tls_socket}", credentials)
        server.add_insecure_port(f"unix:{plain_socket}")
        await server.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print("serving", flush=True)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


def _relay(target: str) -> None:
    """The parent's public relay (its config defaults) from loopback TCP to ``target``, until SIGTERM;
    prints ``listening on tcp:HOST:PORT`` once bound and its stats as JSON when stopped."""
    from nitrovault.transport import Relay, TcpAddress, UnixAddress
    from parent_app.config import ParentConfig

    d: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ParentConfig)}

    async def main() -> None:
        relay = Relay(
            TcpAddress("127.0.0.1", 0),
            UnixAddress(target),
            max_connections=d["max_connections"],
            max_connections_per_source=d["max_connections_per_source"],
            connection_rate_per_source=d["connection_rate_per_source"],
            connection_burst_per_source=d["connection_burst_per_source"],
            idle_timeout=d["idle_timeout_s"],
            tls_handshake_timeout=d["handshake_timeout_s"],
            max_handshake_bytes=d["max_handshake_bytes"],
        )
        await relay.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"listening on {relay.bound}", flush=True)
        await stop.wait()
        stats = relay.stats
        await relay.close()
        print(json.dumps({"total": stats.total, "refused_by_reason": dict(stats.refused_by_reason)}),
              flush=True)

    asyncio.run(main())


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_relay")
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("server")
    server.add_argument("--tls-socket", required=True)
    server.add_argument("--plain-socket", required=True)
    server.add_argument("--key", type=Path, required=True)
    server.add_argument("--cert", type=Path, required=True)
    relay = roles.add_parser("relay")
    relay.add_argument("--target", required=True, help="unix socket path")
    args = parser.parse_args(argv)
    if args.role == "server":
        _serve(args.tls_socket, args.plain_socket, args.key, args.cert)
    else:
        _relay(args.target)
    return 0


# -- process plumbing ---------------------------------------------------------------------------------------


def _spawn(role: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m bench.bench_relay ROLE...``; return it and its first stdout line (its ready line)."""
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_relay", *role],
        env={**os.environ, "PYTHONPATH": path},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith(ready):
        _stop(proc)
        raise RuntimeError(f"bench {role[0]} did not start (said {line!r})")
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait; what it printed after its ready line."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_tcp(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` and of its live children (socat forks one per connection), from
    ``/proc/*/task/*/schedstat`` (nanoseconds; ``/proc/PID/stat`` counts 10 ms ticks, too coarse here)."""
    total = 0
    pids = [str(pid)]
    with contextlib.suppress(OSError):
        pids += Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for one in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{one}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the client side -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Path:
    """One way to the server: a target and how to open a channel to it."""

    name: str
    target: str
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    pid: int | None = None  # the relay process in between, if any

    def channel(self, own_connection: bool = False) -> grpc.Channel:
        options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", SERVER_NAME)]
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, self.credentials, options=options)


def _latency_round(paths: list[_Path], stubs: list[Any]) -> list[dict[str, float]]:
    """``LATENCY_CALLS`` calls on each path, one by one in turn: per path p50/p99 (µs) and relay CPU."""
    samples: list[list[float]] = [[] for _ in paths]
    cpu0 = [_cpu_seconds(p.pid) if p.pid else 0.0 for p in paths]
    for _ in range(LATENCY_CALLS):
        for i, stub in enumerate(stubs):
            t0 = time.perf_counter()
            stub(PAYLOAD, timeout=5)
            samples[i].append(time.perf_counter() - t0)
    out = []
    for i, p in enumerate(paths):
        cpu = (_cpu_seconds(p.pid) - cpu0[i]) / LATENCY_CALLS if p.pid else 0.0
        p50, p99 = _pct(samples[i], 0.5), _pct(samples[i], 0.99)
        out.append({"p50": p50 * 1e6, "p99": p99 * 1e6, "cpu": cpu * 1e6})
    return out


def _rps_batch(pool: ThreadPoolExecutor, channels: list[grpc.Channel]) -> tuple[float, list[float]]:
    """Every channel issues ``RPS_CALLS_PER_WORKER`` calls on its own thread: (calls/s, latencies)."""

    def worker(channel: grpc.Channel) -> list[float]:
        stub = channel.unary_unary(METHOD)
        mine = []
        for _ in range(RPS_CALLS_PER_WORKER):
            t0 = time.perf_counter()
            stub(PAYLOAD, timeout=30)
            mine.append(time.perf_counter() - t0)
        return mine

    started = time.perf_counter()
    results = list(pool.map(worker, channels))
    elapsed = time.perf_counter() - started
    latencies = [x for r in results for x in r]
    return len(latencies) / elapsed, latencies


def _median_of(rounds: list[list[dict[str, float]]], i: int, key: str) -> float:
    return statistics.median(r[i][key] for r in rounds)


def _transport(tmp: Path) -> Iterator[dict[str, Any]]:
    from nitrovault.identity import TlsIdentity

    identity = TlsIdentity.generate(SERVER_NAME, now=datetime.now(UTC))
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    key.write_bytes(identity.private_key_pem)
    key.chmod(0o600)
    cert.write_bytes(identity.chain_pem)
    tls_sock, plain_sock = str(tmp / "tls.sock"), str(tmp / "plain.sock")
    started: list[subprocess.Popen[str]] = []
    relay: subprocess.Popen[str] | None = None
    relay_out = ""
    try:
        server, _ = _spawn(["server", "--tls-socket", tls_sock, "--plain-socket", plain_sock,
                            "--key", str(key), "--cert", str(cert)], "serving")
        started.append(server)
        relay, line = _spawn(["relay", "--target", tls_sock], "listening on tcp:")
        started.append(relay)
        relay_target = line.removeprefix("listening on tcp:")
        socat_reason = None
        socat_path: _Path | None = None
        socat_added = 0.0
        creds = grpc.ssl_channel_credentials(root_certificates=identity.leaf_pem)
        if shutil.which("socat") is None:
            socat_reason = "socat is not installed (make bench installs it with apt-get)"
        else:
            port = _free_port()
            socat = subprocess.Popen(
                ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UNIX-CONNECT:{tls_sock}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            )
            started.append(socat)
            _wait_tcp(port)
            socat_path = _Path("socat", f"ipv4:127.0.0.1:{port}", creds, socat.pid)
        direct = _Path("direct", f"unix:{tls_sock}", creds)
        relayed = _Path("relay", f"ipv4:{relay_target}", creds, relay.pid)
        plain = _Path("plaintext", f"unix:{plain_sock}", None)

        # 1. sequential latency, the paths in turn call by call
        paths = [direct, relayed] + ([socat_path] if socat_path else [])
        channels = [p.channel() for p in paths]
        try:
            stubs = [c.unary_unary(METHOD) for c in channels]
            for _ in range(WARMUP):
                for stub in stubs:
                    stub(PAYLOAD, timeout=10)
            rounds = [_latency_round(paths, stubs) for _ in range(ROUNDS)]
        finally:
            for c in channels:
                c.close()
        d50, d99 = _median_of(rounds, 0, "p50"), _median_of(rounds, 0, "p99")
        r50, r99 = _median_of(rounds, 1, "p50"), _median_of(rounds, 1, "p99")
        added = r50 - d50
        socat_fig: dict[str, Any] = {"socat_p50_us": None, "socat_p99_us": None,
                                     "socat_added_latency_us": None, "socat_added_p99_us": None,
                                     "socat_cpu_us_per_call": None, "socat_missing": socat_reason}
        if socat_path is not None:
            s50, s99 = _median_of(rounds, 2, "p50"), _median_of(rounds, 2, "p99")
            socat_fig = {
                "socat_p50_us": round(s50, 1),
                "socat_p99_us": round(s99, 1),
                "socat_added_latency_us": round(s50 - d50, 1),
                "socat_added_p99_us": round(s99 - d99, 1),
                "socat_cpu_us_per_call": round(_median_of(rounds, 2, "cpu"), 1),
                "socat_missing": None,
            }
            socat_added = s50 - d50
        yield {
            "name": "relay_added_latency_us",
            "headline": "value",
            "value": round(added, 1),
            "unit": "us",
            "target": "added p50 <= 300 us",
            "met": added <= 300,
            "call": f"unary echo, {len(PAYLOAD)} B, TLS 1.3 pinned, sequential",
            "calls_per_round": LATENCY_CALLS,
            "rounds": ROUNDS,
            "direct_p50_us": round(d50, 1),
            "direct_p99_us": round(d99, 1),
            "relay_p50_us": round(r50, 1),
            "relay_p99_us": round(r99, 1),
            "relay_added_p99_us": round(r99 - d99, 1),
            "relay_added_p50_us_per_round": [round(r[1]["p50"] - r[0]["p50"], 1) for r in rounds],
            "relay_cpu_us_per_call": round(_median_of(rounds, 1, "cpu"), 1),
            **socat_fig,
            "ratio": round(added / socat_added, 3) if socat_path is not None and socat_added > 0 else None,
            "ratio_is": "our added p50 / socat's added p50 (not the headline)",
        }

        # 2 and 3. throughput at CONCURRENCY, fixed call count, one connection per client thread
        kinds = [direct, relayed, plain] + ([socat_path] if socat_path else [])
        per_kind = {p.name: [p.channel(own_connection=True) for _ in range(CONCURRENCY)] for p in kinds}
        rps: dict[str, list[float]] = {p.name: [] for p in kinds}
        lat: dict[str, list[float]] = {p.name: [] for p in kinds}
        cpu: dict[str, list[float]] = {p.name: [] for p in kinds}  # the relay process's, µs per call
        whole: dict[str, list[float]] = {p.name: [] for p in kinds}  # client + server + relay, µs per call
        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                for p in kinds:  # connect every channel, warm both ends and the pool: one untimed batch
                    _rps_batch(pool, per_kind[p.name])
                for n in range(RPS_ROUNDS):
                    for p in kinds[n % len(kinds):] + kinds[:n % len(kinds)]:
                        relay0 = _cpu_seconds(p.pid) if p.pid else 0.0
                        rest0 = _cpu_seconds(server.pid) + time.process_time()
                        value, latencies = _rps_batch(pool, per_kind[p.name])
                        relay_cpu = _cpu_seconds(p.pid) - relay0 if p.pid else 0.0
                        rest = _cpu_seconds(server.pid) + time.process_time() - rest0
                        cpu[p.name].append(relay_cpu / len(latencies) * 1e6)
                        whole[p.name].append((relay_cpu + rest) / len(latencies) * 1e6)
                        rps[p.name].append(value)
                        lat[p.name].extend(latencies)
        finally:
            for cs in per_kind.values():
                for c in cs:
                    c.close()
        med = {k: statistics.median(v) for k, v in rps.items()}
        cpu_per_call = {k: statistics.median(v) for k, v in whole.items()}

        def paired(a: str, b: str) -> tuple[float, list[float]]:
            """Median over rounds of a's rps / b's rps in the same round (robust to drifting load)."""
            per_round = [x / y for x, y in zip(rps[a], rps[b], strict=True)]
            return statistics.median(per_round), [round(r, 3) for r in per_round]

        def figures(name: str) -> dict[str, Any]:
            return {
                f"{name}_rps": round(med[name], 1),
                f"{name}_rps_per_round": [round(v, 1) for v in rps[name]],
                f"{name}_p50_ms": round(_pct(lat[name], 0.5) * 1e3, 3),
                f"{name}_p99_ms": round(_pct(lat[name], 0.99) * 1e3, 3),
            }

        shape = {
            "concurrency": CONCURRENCY,
            "clients": f"{CONCURRENCY} threads, one channel (own connection) each",
            "calls_per_batch": CONCURRENCY * RPS_CALLS_PER_WORKER,
            "rounds": RPS_ROUNDS,
        }
        ratio, ratios = paired("relay", "direct")
        yield {
            "name": "relay_vs_direct_rps",
            "headline": "ratio",
            "ratio": round(ratio, 3),
            "ratio_is": "median over rounds of relayed rps / direct rps in the same round",
            "ratio_per_round": ratios,
            "ratio_of_medians": round(med["relay"] / med["direct"], 3),
            "target": ">= 0.9",
            "met": ratio >= 0.9,
            **shape,
            **figures("direct"),
            **figures("relay"),
            "relay_cpu_us_per_call": round(statistics.median(cpu["relay"]), 1),
            "cpu_us_per_call": {k: round(v, 1) for k, v in cpu_per_call.items()},
            "cpu_bound_ratio": round(cpu_per_call["direct"] / cpu_per_call["relay"], 3),
            "cpu_bound_ratio_is": "direct CPU per call / relayed CPU per call (client + server + relay): "
                                  "the rps ratio a CPU-bound machine would show, insensitive to load",
            "socat_rps": round(med["socat"], 1) if socat_path else None,
            "socat_vs_direct": round(paired("socat", "direct")[0], 3) if socat_path else None,
            "socat_cpu_us_per_call": round(statistics.median(cpu["socat"]), 1) if socat_path else None,
            "socat_missing": socat_reason,
        }
        tls_ratio, tls_ratios = paired("direct", "plaintext")
        yield {
            "name": "confidential_vs_plaintext_rps",
            "headline": "ratio",
            "ratio": round(tls_ratio, 3),
            "ratio_is": "median over rounds of TLS rps / plaintext rps in the same round",
            "ratio_per_round": tls_ratios,
            "ratio_of_medians": round(med["direct"] / med["plaintext"], 3),
            "path": "direct unix socket, same server process, TLS port vs insecure port",
            **shape,
            "tls_rps": round(med["direct"], 1),
            "cpu_bound_ratio": round(cpu_per_call["plaintext"] / cpu_per_call["direct"], 3),
            "tls_p50_ms": round(_pct(lat["direct"], 0.5) * 1e3, 3),
            "tls_p99_ms": round(_pct(lat["direct"], 0.99) * 1e3, 3),
            **figures("plaintext"),
        }
    finally:
        for proc in reversed(started):
            out = _stop(proc)
            if proc is relay:
                relay_out = out
    _check_relay_refused_nothing(relay_out)


def _check_relay_refused_nothing(out: str) -> None:
    """The relay's admission caps and TLS guard must not have closed a benchmark connection."""
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return
    refused = {k: v for k, v in json.loads(lines[-1])["refused_by_reason"].items() if v}
    if refused:
        raise RuntimeError(f"the relay refused benchmark connections: {refused}")


# -- 4. first call: the real enclave server in process ------------------------------------------------------


class _EnclaveThread:
    """An :class:`EnclaveServer` (TLS, local NSM) on an event loop in a daemon thread."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="enclave-loop", daemon=True)
        self.thread.start()
        self.server = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def _first_call(tmp: Path) -> Iterator[dict[str, Any]]:
    import torch
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from enclave_app.config import Access, EnclaveConfig
    from enclave_app.models import load_handler
    from enclave_app.models.generic import MLPClassifier
    from enclave_app.outputs import OutputGuard, SealedExtras
    from enclave_app.server import EnclaveServer, ServingModel
    from nitrovault.attestation import Expectations, verify_document
    from nitrovault.client import Expect, NitrovaultClient, probe_certificate
    from nitrovault.identity import TlsIdentity
    from nitrovault.local.nsm import make_local_nsm
    from nitrovault.local.pki import LocalPki
    from nitrovault.owner.issuer import TokenIssuer

    pcrs = {0: bytes([0xB0]) * 48, 1: bytes([0xB1]) * 48, 2: bytes([0xB2]) * 48}
    issuer = TokenIssuer(ed25519.Ed25519PrivateKey.generate(), "bench", "https://issuer.bench", "bench")
    config = EnclaveConfig(
        model_id="mlp",
        model_version="1",
        handler="generic:mlp-classifier",
        kms_key_arn="arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000",
        region="us-east-1",
        encryption_context={"model": "mlp", "version": "1"},
        access=Access(issuer="https://issuer.bench", audience="bench", jwks=issuer.jwks,
                      tiers={"default": {"rate_per_s": 1e6, "burst": 10**6}}),
    )
    mlp = {"in_features": 8, "hidden": [16], "classes": 3}
    torch.manual_seed(0)
    state = MLPClassifier(**mlp).eval().state_dict()  # type: ignore[arg-type]
    handler = load_handler("generic:mlp-classifier", state, {"nitrovault.config": json.dumps(mlp)})
    identity = TlsIdentity.generate(SERVER_NAME, now=datetime.now(UTC))
    nsm = make_local_nsm(tmp / "pki", pcrs)
    socket_path = str(tmp / "enclave.sock")

    async def make() -> EnclaveServer:
        server = EnclaveServer(config, nsm, socket_path, tls=identity)
        await server.start()
        outputs = OutputGuard.for_handler(config.protection, SealedExtras(), handler)
        await server.serve(ServingModel(handler=handler, sealed_digest="ab" * 32, outputs=outputs))
        return server

    enclave = _EnclaveThread(make)
    try:
        expect = Expect(pcrs=pcrs, root=LocalPki.ensure(tmp / "pki").root)
        token = issuer.issue("bench", ["infer:*"], 3600)
        target = f"unix:{socket_path}"

        def fresh() -> tuple[float, float]:
            """(verify s, first Info s) of a new client; closed afterwards, so the next one reconnects."""
            with NitrovaultClient(target, expect=expect, token=token, timeout=10) as client:
                t0 = time.perf_counter()
                client.connect()  # steps 1-4: TLS probe, pinned channel, Attest + verify, binding
                t1 = time.perf_counter()
                client.info()
                t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        fresh()  # warm imports, the PKI and both ends' code paths
        firsts = [fresh() for _ in range(FRESH_CLIENTS)]
        with NitrovaultClient(target, expect=expect, token=token, timeout=10) as client:
            client.info()
            for _ in range(10):
                client.info()
            warms = []
            for _ in range(WARM_CALLS):
                t0 = time.perf_counter()
                client.info()
                warms.append(time.perf_counter() - t0)
            # the parts of verification on their own: a TLS handshake (step 1), an Attest round trip
            # (the enclave's NSM signs), the document's checks (pure crypto: chain, signature, PCRs, nonce)
            parts: dict[str, list[float]] = {"probe": [], "attest_rpc": [], "verify_document": []}
            for _ in range(FRESH_CLIENTS):
                t0 = time.perf_counter()
                probe_certificate(target, timeout=10)
                t1 = time.perf_counter()
                nonce = os.urandom(32)
                document = client.attest(nonce)
                t2 = time.perf_counter()
                verify_document(document, at=datetime.now(UTC), root=expect.root,
                                expect=Expectations(pcrs=expect.pcrs, nonce=nonce))
                t3 = time.perf_counter()
                for part, took in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    parts[part].append(took)
    finally:
        enclave.close()
    first = statistics.median(v + c for v, c in firsts) * 1e3
    warm = statistics.median(warms) * 1e3
    yield {
        "name": "first_call_ms",
        "headline": "value",
        "value": round(first, 2),
        "unit": "ms",
        "ratio": round(first / warm, 1),
        "ratio_is": "first call on a fresh client / warm call",
        "call": "Info (token checked, no model work)",
        "server": "EnclaveServer in this process (event-loop thread), TLS, local NSM, unix socket",
        "fresh_clients": FRESH_CLIENTS,
        "first_call_max_ms": round(max(v + c for v, c in firsts) * 1e3, 2),
        "verify_ms": round(statistics.median(v for v, _ in firsts) * 1e3, 2),
        "verify_parts_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in parts.items()},
        "first_rpc_after_verify_ms": round(statistics.median(c for _, c in firsts) * 1e3, 2),
        "warm_call_ms": round(warm, 3),
        "warm_p99_ms": round(_pct(warms, 0.99) * 1e3, 3),
        "added_ms": round(first - warm, 2),
    }


def run() -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="nv-relay-", dir="/tmp") as tmp:
        yield from _transport(Path(tmp))
        yield from _first_call(Path(tmp))


if __name__ == "__main__":
    sys.exit(_main())
