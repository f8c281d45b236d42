"""``protections_overhead_us``: what token check + quota + receipt + audit record add to one call;
``output_guard_overhead_us``: what the output protections add to one answered row.

Measured in process on the pure components (:class:`enclave_app.protections.Protections`, the same object
the server uses), around Info-sized work (building a small response message), so the figure is the
protections' cost, not the model's or the network's. ``baseline_p50_us`` is the same work without them;
``protections_overhead_us`` the difference of the p50s (target ≤ 100 µs). The token is a real EdDSA JWT
(the verifier's signature cache is warm after the first call, as for a client that reuses its token).

``metrics_overhead_us``: the same protected call with the enclave's aggregate metrics on
(:class:`enclave_app.metrics.EnclaveMetrics`: a counter, a histogram and, for a refusal, another counter
under one lock) against off, in alternating rounds (medians of the rounds' p50s); ``ratio`` = on over off.

``output_guard_overhead_us`` (one line per policy): :class:`enclave_app.outputs.OutputGuard` around a
one-row call of a digits-sized classifier (``MLPClassifier(64, [64], 10)``, the extraction benchmark's
victim), against the bare model call of the same run. The monitor's state grows as a real subject's
would (one subject, distinct random rows), so PRADA's Shapiro-Wilk test and the coverage cells run on
every call once ``prada_min_samples`` rows were seen.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ed25519

from bench.timing import p50_us
from enclave_app.config import Access, EnclaveConfig
from enclave_app.metrics import EnclaveMetrics
from enclave_app.protections import CallRecord, Protections
from nitrovault.owner.issuer import TokenIssuer
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb

CALLS = 3000
METRICS_ROUNDS = 6


def _p50(fn: Callable[[], object], n: int = CALLS) -> float:
    return p50_us(fn, n)


def run() -> Iterator[dict[str, object]]:
    issuer = TokenIssuer(ed25519.Ed25519PrivateKey.generate(), "k1", "https://issuer.bench", "nitrovault")
    config = EnclaveConfig(
        model_id="m", model_version="1", handler="sentence-embedding",
        kms_key_arn="arn:aws:kms:us-east-1:111122223333:key/x", region="us-east-1",
        encryption_context={"model": "m", "version": "1"},
        access=Access(issuer="https://issuer.bench", audience="nitrovault", jwks=issuer.jwks,
                      tiers={"default": {"rate_per_s": 1e9, "burst": 10**9}}),
    )
    lines: list[bytes] = []
    guard = Protections(config, ed25519.Ed25519PrivateKey.generate(), pcr0=bytes(48), sink=lines.append,
                        clock=lambda: datetime.now(UTC))
    guard.serving("ab" * 32)
    metadata = (("authorization", f"Bearer {issuer.issue('bench', ['embed:*'], 3600)}"),)
    request = pb.EmbedRequest(texts=["A man is eating food."]).SerializeToString()

    def work() -> pb.EmbedResponse:
        return pb.EmbedResponse(model_id="m@1")

    def protected() -> pb.EmbedResponse:
        started = time.perf_counter_ns()
        call = CallRecord(method="Embed", model="m", items=1)
        call.principal = guard.authenticate(metadata, "Embed")
        call.quota = guard.charge(call.principal, 1)
        response = work()
        receipt = guard.sign(call.principal, "Embed", request, response.SerializeToString(deterministic=True))
        response.receipt.payload = receipt.body
        response.receipt.signature = receipt.signature
        response.receipt.key_id = receipt.key_id
        call.receipt_id = receipt.receipt_id
        guard.record(call, decision="ok", latency_us=(time.perf_counter_ns() - started) // 1000)
        return response

    baseline = _p50(work)
    with_protections = _p50(protected)
    overhead = with_protections - baseline
    metrics = EnclaveMetrics()  # what the server adds to every recorded call: counters, a histogram
    on: list[float] = []
    off: list[float] = []
    for _ in range(METRICS_ROUNDS):  # alternating rounds: both see the same drift of the machine's load
        guard.metrics = metrics
        on.append(_p50(protected, CALLS // METRICS_ROUNDS))
        guard.metrics = None
        off.append(_p50(protected, CALLS // METRICS_ROUNDS))
    with_metrics, without_metrics = statistics.median(on), statistics.median(off)
    yield {
        "name": "protections_overhead_us",
        "protections_overhead_us": round(overhead, 1),
        "baseline_p50_us": round(baseline, 2),
        "protected_p50_us": round(with_protections, 1),
        "ratio": round(with_protections / baseline, 1) if baseline else None,
        "target_us": 100,
        "calls": CALLS,
        "audit_lines": len(lines),
    }
    yield {
        "name": "metrics_overhead_us",
        "value": round(with_metrics - without_metrics, 2),
        "ratio": round(with_metrics / without_metrics, 3) if without_metrics else None,
        "with_metrics_p50_us": round(with_metrics, 1),
        "without_metrics_p50_us": round(without_metrics, 1),
        "calls": CALLS,
        "rounds": METRICS_ROUNDS,
    }
    yield from _guard_lines()


def _guard_lines() -> Iterator[dict[str, object]]:
    import numpy as np
    import torch

    from enclave_app.config import Protection
    from enclave_app.models.generic import MLPClassifier
    from enclave_app.outputs import GuardNotes, OutputGuard, SealedExtras

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLPClassifier(64, [64], 10).eval()
    rng = np.random.default_rng(0)
    reference = rng.random((500, 64))
    rows = torch.from_numpy(rng.random((CALLS + 400, 64), dtype=np.float32))
    policies: dict[str, dict[str, object]] = {
        "none": {},
        "reverse_sigmoid": {"hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3}},
        "reverse_sigmoid+detection": {"hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
                                      "extraction": {"volume_max": 10**9}},
        "reverse_sigmoid+detection+laplace": {
            "hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
            "extraction": {"volume_max": 10**9},
            "privacy": {"mechanism": {"kind": "laplace", "epsilon": 0.5, "sensitivity": 2.0},
                        "budget": {"epsilon": 1e9}}},
    }

    def each_row(call: Callable[[torch.Tensor], object]) -> Callable[[], object]:
        """``call`` on the next one-row input each time (distinct rows, as a real subject's would be)."""
        row = itertools.cycle(rows)
        return lambda: call(next(row)[None])

    def bare(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return model(x=x)

    baseline = _p50(each_row(bare))
    for name, section in policies.items():
        guard = OutputGuard(Protection.from_mapping(section), SealedExtras(reference=reference))

        def guarded(x: torch.Tensor, guard: OutputGuard = guard) -> object:
            with torch.inference_mode():
                outputs = model(x=x)
            guard.admit("bench")
            return guard.classifier("bench", {"x": x}, outputs, GuardNotes())

        p50 = _p50(each_row(guarded))
        yield {"name": "output_guard_overhead_us", "policy": name, "overhead_us": round(p50 - baseline, 1),
               "model_p50_us": round(baseline, 1), "guarded_p50_us": round(p50, 1),
               "ratio": round(p50 / baseline, 2), "calls": CALLS}
