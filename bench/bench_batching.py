"""What a caller pays for nitrovault: MiniLM ``Embed`` served by the local stack vs the same model in process
(``python -m bench.run batching``).

The stack runs every production piece (the parent's TLS relay, the enclave's vsock relay, TLS ending in the
enclave, token, quota, receipts, audit). The plain baseline is the same handler over the same weights
(plain safetensors), in this process, fed by the same number of threads through the same
:class:`~enclave_app.batching.Batcher` settings: the batching is the same, so the ratio is the price of
the protection and the transport, not of a different batching policy.

* ``served_vs_plain_embed_rps``: one-sentence calls per second at concurrency 16, stack / plain. Target
  >= 0.7.
* ``batching_speedup``: the stack at concurrency 16 with dynamic batching / with ``max_rows = 1``.
  Target >= 2.
* ``embed_latency_ms``: p50 and p99 at concurrency 1 and 16, stack and plain (one row per concurrency,
  ``ratio`` = stack p50 / plain p50).

Each figure is DURATION_S seconds of calls after a warm-up; the clients run in this process, on the same
vCPUs as the stack (as a co-located caller would), which the plain baseline does not pay.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.timing import concurrent_load, percentile_ms
from enclave_app.batching import Batcher, Job
from enclave_app.config import Batching
from nitrovault.client import NitrovaultClient
from nitrovault.local.homes import Paths
from nitrovault.local.models import demo_handler, demo_model
from nitrovault.local.provision import LOCAL_TIERS
from nitrovault.local.stack import LocalStack, TextProgress

DURATION_S = 5.0
SENTENCE = "a small request to the served model"
CONCURRENCY = (1, 16)


def _stack_load(stack: LocalStack, token: str, concurrency: int) -> tuple[float, list[float]]:
    clients = [NitrovaultClient(stack.listen, expect=stack.expect(), timeout=60, token=token)
               for _ in range(concurrency)]
    try:
        return concurrent_load(lambda i: lambda: clients[i].embed([SENTENCE]), concurrency, DURATION_S)
    finally:
        for client in clients:
            client.close()


class Plain:
    """The served handler in process behind a :class:`Batcher` with the enclave's default settings."""

    def __init__(self) -> None:
        self.handler = demo_handler()
        self.handler.warm_up()
        vcpus = os.cpu_count() or 1
        threads = Batching().threads_per_worker(vcpus, vcpus)
        self.batcher: Batcher[Sequence[str], np.ndarray] = Batcher(
            self._run, workers=vcpus, max_rows=Batching().max_rows,
            on_start=lambda: torch.set_num_threads(threads), name="plain")

    def _run(self, calls: Sequence[Sequence[str]]) -> list[np.ndarray]:
        texts = [t for c in calls for t in c]
        vectors = self.handler.embed(texts, normalize=False)
        return list(np.split(vectors, np.cumsum([len(c) for c in calls])[:-1]))

    def call(self) -> object:
        return self.batcher.submit(Job([SENTENCE], rows=1, key="embed")).result()

    def close(self) -> None:
        self.batcher.close()


def _figures(latencies: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile_ms(latencies, 0.5), "p99_ms": percentile_ms(latencies, 0.99)}


def _stack(home: Path, batching: Mapping[str, Any] | None) -> LocalStack:
    tiers: dict[str, Mapping[str, Any]] = {**LOCAL_TIERS, "bench": {"rate_per_s": 1e6, "burst": 10**6}}
    model = replace(demo_model(Paths(home)), tiers=tiers, batching=batching)
    return LocalStack(home, model=model, listen="127.0.0.1:50161", progress=TextProgress(sys.stderr))


def run() -> Iterator[dict[str, Any]]:
    served: dict[int, tuple[float, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="nv-bench-") as tmp:
        stack = _stack(Path(tmp) / "batched", None)
        try:
            stack.start()
            token = stack.token("bench", tier="bench")
            for concurrency in CONCURRENCY:
                served[concurrency] = _stack_load(stack, token, concurrency)
        finally:
            stack.close()
        stack = _stack(Path(tmp) / "unbatched", {"max_rows": 1})
        try:
            stack.start()
            unbatched_rps, unbatched_latencies = _stack_load(stack, stack.token("bench", tier="bench"), 16)
        finally:
            stack.close()
    plain = Plain()
    try:
        baseline = {c: concurrent_load(lambda _: plain.call, c, DURATION_S) for c in CONCURRENCY}
    finally:
        plain.close()

    rps, _ = served[16]
    yield {
        "name": "served_vs_plain_embed_rps",
        "call": "Embed(1 sentence)",
        "concurrency": 16,
        "served_rps": round(rps, 1),
        "plain_rps": round(baseline[16][0], 1),
        "ratio": round(rps / baseline[16][0], 3),
        "target": ">= 0.7",
    }
    yield {
        "name": "batching_speedup",
        "call": "Embed(1 sentence) through the stack",
        "concurrency": 16,
        "batched_rps": round(rps, 1),
        "unbatched_rps": round(unbatched_rps, 1),
        "unbatched": _figures(unbatched_latencies),
        "ratio": round(rps / unbatched_rps, 3),
        "target": ">= 2",
    }
    for concurrency in CONCURRENCY:
        stack_figures = _figures(served[concurrency][1])
        plain_figures = _figures(baseline[concurrency][1])
        yield {
            "name": "embed_latency_ms",
            "call": "Embed(1 sentence)",
            "concurrency": concurrency,
            "served": stack_figures,
            "plain": plain_figures,
            "ratio": round(stack_figures["p50_ms"] / plain_figures["p50_ms"], 3),
        }
