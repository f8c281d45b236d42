"""Serving benchmarks over the real local stack (``python -m bench.run serving``).

* ``stack_relay_vs_direct_rps``: requests per second of a small call (``Embed`` of one short sentence
  through the MiniLM the stack serves) through the parent's TLS relay + the enclave's relay + enclave (TLS
  ends in the enclave), over the same call made directly to the enclave's gRPC server socket (the same
  TLS), both measured in this run with the same concurrency. Target >= 0.8.
* ``stack_relay_added_latency_us``: p50 latency of ``Info`` (no model work, so the transport dominates)
  through both relays (the parent's and the enclave's vsock one) minus direct, sequential calls made
  alternately on one client each. Target <= 500 us on loopback.
* ``cold_start``: seconds from the enclave process's start to SERVING, split into the boot steps the
  enclave reports, with the ratio of the whole to loading the plain model in a fresh process (same
  handler code, plaintext safetensors, no attestation, no KMS, no decryption).

Every call carries a token from the stack's issuer in a ``bench`` quota tier large enough that quotas
never refuse a call (the figures measure transport and model, not the limiter).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.timing import concurrent_load, percentile_ms
from nitrovault.client import Expect, NitrovaultClient
from nitrovault.local.homes import Paths
from nitrovault.local.models import demo_model
from nitrovault.local.provision import LOCAL_TIERS
from nitrovault.local.stack import LocalStack, TextProgress

DURATION_S = 5.0
CONCURRENCY = 4
LATENCY_CALLS = 400


def _rps(target: str, token: str, expect: Expect,
         call: Callable[[NitrovaultClient], object]) -> tuple[float, list[float]]:
    clients = [NitrovaultClient(target, expect=expect, timeout=30, token=token) for _ in range(CONCURRENCY)]
    try:
        return concurrent_load(lambda i: lambda: call(clients[i]), CONCURRENCY, DURATION_S)
    finally:
        for client in clients:
            client.close()


def _sequential(direct: str, relayed: str, token: str, expect: Expect,
                call: Callable[[NitrovaultClient], object]) -> tuple[list[float], list[float]]:
    """Sequential latencies of ``call`` straight to ``direct`` and through ``relayed``, one call of each in
    turn, so that both see the same load from everything else on the machine."""
    with NitrovaultClient(direct, expect=expect, timeout=30, token=token) as near, \
            NitrovaultClient(relayed, expect=expect, timeout=30, token=token) as far:
        for _ in range(50):
            call(near)
            call(far)
        out: tuple[list[float], list[float]] = ([], [])
        for _ in range(LATENCY_CALLS):
            for client, times in ((near, out[0]), (far, out[1])):
                t = time.perf_counter()
                call(client)
                times.append(time.perf_counter() - t)
    return out


PLAIN_LOAD = """
import json, sys, time
from pathlib import Path
from safetensors.torch import load_file
from enclave_app.models import load_handler
from nitrovault.local.models import demo_model_source
source, metadata = demo_model_source()
handler = load_handler("sentence-embedding", load_file(source), metadata)
handler.warm_up()
"""


def _plain_load_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PLAIN_LOAD], check=True, capture_output=True)
    return time.perf_counter() - started


def run() -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="nv-bench-") as tmp:
        home = Path(tmp)
        tiers: dict[str, Mapping[str, Any]] = {**LOCAL_TIERS, "bench": {"rate_per_s": 1e6, "burst": 10**6}}
        model = replace(demo_model(Paths(home)), tiers=tiers)
        stack = LocalStack(home, model=model, listen="127.0.0.1:50151", progress=TextProgress(sys.stderr))
        try:
            boot = stack.start()
            token = stack.token("bench", tier="bench")
            relayed = stack.listen
            direct = f"unix:{stack.paths.run / 'enclave' / 'grpc.sock'}"
            expect = stack.expect()  # the measured PCR0/1/2 under the stack's local PKI root

            def embed(c: NitrovaultClient) -> object:
                return c.embed(["a small request"])

            rps_direct, lat_direct = _rps(direct, token, expect, embed)
            rps_relay, lat_relay = _rps(relayed, token, expect, embed)
            yield {
                "name": "stack_relay_vs_direct_rps",
                "call": "Embed(1 sentence)",
                "concurrency": CONCURRENCY,
                "direct_rps": round(rps_direct, 1),
                "relay_rps": round(rps_relay, 1),
                "direct_p50_ms": percentile_ms(lat_direct, 0.5),
                "direct_p99_ms": percentile_ms(lat_direct, 0.99),
                "relay_p50_ms": percentile_ms(lat_relay, 0.5),
                "relay_p99_ms": percentile_ms(lat_relay, 0.99),
                "ratio": round(rps_relay / rps_direct, 3),
                "target": ">= 0.8",
            }

            def info(c: NitrovaultClient) -> object:
                return c.info()

            seq_direct, seq_relay = _sequential(direct, relayed, token, expect, info)
            p50_direct = statistics.median(seq_direct)
            p50_relay = statistics.median(seq_relay)
            added_us = (p50_relay - p50_direct) * 1e6
            yield {
                "name": "stack_relay_added_latency_us",
                "call": "Info",
                "direct_p50_us": round(p50_direct * 1e6, 1),
                "relay_p50_us": round(p50_relay * 1e6, 1),
                "added_p50_us": round(added_us, 1),
                "ratio": round(p50_relay / p50_direct, 3),
                "target": "added <= 500 us",
            }
        finally:
            stack.close()
    plain = _plain_load_s()
    whole = boot.get("since_process_start_s", boot.get("total_s", 0.0))
    yield {
        "name": "cold_start",
        "seconds": round(whole, 3),
        "steps": {k.removesuffix("_s"): v for k, v in boot.items() if k != "since_process_start_s"},
        "plain_load_seconds": round(plain, 3),
        "ratio": round(whole / plain, 3),
    }
