"""Latency the parent's gRPC bridge hop adds (``python -m bench.run bridge``).

* ``bridge_hop_latency_us``: p50 of sequential tiny unary calls through the bridge against the same
  calls made directly to the upstream, on the unary fast path (a method in ``DEFAULT_UNARY_METHODS``)
  and on the generic stream-stream path (any other method). An echo upstream (a sync gRPC server with a
  generic bytes handler) runs in this process on a unix socket; the bridge runs in its own process
  through its real command line (``python -m parent_app.bridge``), as it is deployed: a client, the
  bridge and the enclave never share an interpreter, and in one process the bridge's threads would fight
  the client's for the GIL and measure that instead. Direct and bridged calls alternate one by one, so
  both see the same load from the other processes sharing the CPUs; each round is ``CALLS`` pairs and
  the reported numbers are the median over ``ROUNDS`` rounds. ``bridge_cpu_us_per_call`` is the CPU
  time (user + system) the bridge process spends per call, which load on the machine disturbs less than
  latency. ``ratio`` is bridged p50 over direct p50.

``NV_BENCH_BRIDGE_MODULE`` names another module with the same command line (default
``parent_app.bridge``), to compare two implementations on the same machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

CALLS = 2000
WARMUP = 200
ROUNDS = 3
UNARY_METHOD = "/grpc.health.v1.Health/Check"  # in DEFAULT_UNARY_METHODS: the bridge's unary fast path
STREAM_METHOD = "/bench.Echo/Unary"  # in no list: the bridge's generic stream-stream path
REPO = Path(__file__).resolve().parent.parent


class _Echo(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no type stubs
    def service(self, details: grpc.HandlerCallDetails) -> Any:
        if details.method in (UNARY_METHOD, STREAM_METHOD):
            return grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_serving(target: str, method: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    with grpc.insecure_channel(target) as ch:
        while True:
            try:
                ch.unary_unary(method)(b"up", timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _round(direct: Any, bridged: Any, pid: int) -> tuple[float, float, float]:
    """One round of alternating calls: (direct p50 us, bridged p50 us, bridge CPU us per call)."""
    d, b = [], []
    cpu0 = _cpu_seconds(pid)
    for _ in range(CALLS):
        t0 = time.perf_counter()
        direct(b"ping", timeout=5)
        t1 = time.perf_counter()
        bridged(b"ping", timeout=5)
        t2 = time.perf_counter()
        d.append(t1 - t0)
        b.append(t2 - t1)
    cpu = (_cpu_seconds(pid) - cpu0) / CALLS
    return statistics.median(d) * 1e6, statistics.median(b) * 1e6, cpu * 1e6


def run() -> Iterator[dict[str, Any]]:
    module = os.environ.get("NV_BENCH_BRIDGE_MODULE", "parent_app.bridge")
    with tempfile.TemporaryDirectory(prefix="nv-bench-bridge-") as tmp:
        upstream_target = f"unix:{Path(tmp) / 'upstream.sock'}"
        public = f"unix:{Path(tmp) / 'public.sock'}"
        upstream = grpc.server(ThreadPoolExecutor(max_workers=4))
        upstream.add_generic_rpc_handlers((_Echo(),))
        upstream.add_insecure_port(upstream_target)
        upstream.start()
        path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
        env = {**os.environ, "PYTHONPATH": path}
        bridge = subprocess.Popen(
            [sys.executable, "-m", module, "--listen", public, "--upstream", upstream_target],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_serving(public, UNARY_METHOD)
            with grpc.insecure_channel(upstream_target) as dch, grpc.insecure_channel(public) as bch:
                for method, path in ((UNARY_METHOD, "unary"), (STREAM_METHOD, "stream")):
                    direct, bridged = dch.unary_unary(method), bch.unary_unary(method)
                    for _ in range(WARMUP):
                        direct(b"ping", timeout=5)
                        bridged(b"ping", timeout=5)
                    rounds = [_round(direct, bridged, bridge.pid) for _ in range(ROUNDS)]
                    d = statistics.median(r[0] for r in rounds)
                    b = statistics.median(r[1] for r in rounds)
                    yield {
                        "name": "bridge_hop_latency_us",
                        "bridge_module": module,
                        "path": path,
                        "calls": CALLS,
                        "rounds": ROUNDS,
                        "direct_p50_us": round(d, 1),
                        "bridge_p50_us": round(b, 1),
                        "added_p50_us": round(b - d, 1),
                        "added_p50_us_per_round": [round(r[1] - r[0], 1) for r in rounds],
                        "bridge_cpu_us_per_call": round(statistics.median(r[2] for r in rounds), 1),
                        "ratio": round(b / d, 3),
                    }
        finally:
            bridge.terminate()
            try:
                bridge.wait(10)
            except subprocess.TimeoutExpired:
                bridge.kill()
                bridge.wait()
            upstream.stop(None)
