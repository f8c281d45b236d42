"""The enclave's aggregate serving metrics, sent to the parent over the host channel.

What leaves the enclave is aggregates only: counters and fixed-bucket histograms whose label values
come from closed sets (RPC method names, gRPC status names, refusal decisions and the short reason
slugs of :mod:`nitrovault.errors`), never a subject id, a token, an input or an output. A label value
that does not look like a slug is sent as ``other``, so a future reason string cannot smuggle data out.

Names (the parent re-exports each as ``nitrovault_enclave_<name>``, with an ``enclave`` label):

* ``calls_total{method, code}`` counter: calls answered, by gRPC status name;
* ``call_seconds{method}`` histogram: time from admission to answer;
* ``refusals_total{decision, reason}`` counter: refused calls (``quota``, ``denied``, ``error``);
* ``batch_rows`` histogram: rows per forward pass; ``queue_wait_seconds`` histogram: a call's wait for
  a worker;
* ``audit_backlog`` gauge: audit entries the parent has not stored yet; ``audit_withheld`` gauge: 1
  while protected calls are refused because of it;
* ``weights_integrity_failures_total`` counter: dynamic-weights blocks whose ciphertext failed to
  authenticate (the enclave then stops serving).

Why by hand: the measured image carries no metrics library (every dependency is in PCR0 and its hash
lock), and what is needed here is a few locked counters and cumulative histograms snapshotted into the
host protocol's ``MetricsReport``; the parent re-exports them with ``prometheus-client``.
:class:`MetricsReporter` sends a snapshot every ``interval_s`` from a thread (best effort: a parent that
does not take it loses nothing but figures) and once more at shutdown.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb

log = logging.getLogger(__name__)

#: seconds; Prometheus' default buckets widened to the slow end of model calls
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: rows per forward pass
ROW_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
_SLUG = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,47}")

Labels = tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=1024)
def label(value: str | None) -> str:
    """``value`` if it is a short slug, else ``other`` (label values never carry free text)."""
    return value if value is not None and _SLUG.fullmatch(value) else "other"


@dataclass
class Histogram:
    """Cumulative-on-export histogram: ``counts[i]`` observations ``<= bounds[i]``, the last ``+Inf``."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class EnclaveMetrics:
    """Thread-safe aggregates (module docstring); ``snapshot`` makes the report the parent re-exports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], Histogram] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def _inc(self, name: str, labels: Labels, by: float = 1.0) -> None:
        self._counters[(name, labels)] = self._counters.get((name, labels), 0.0) + by

    def _observe(self, name: str, labels: Labels, bounds: Sequence[float], value: float) -> None:
        histogram = self._histograms.get((name, labels))
        if histogram is None:
            histogram = self._histograms[(name, labels)] = Histogram(bounds)
        histogram.observe(value)

    def call(self, method: str, code: str, seconds: float, *, decision: str = "ok",
             reason: str | None = None) -> None:
        """One answered call (``decision`` other than ``ok`` also counts a refusal)."""
        with self._lock:
            self._inc("calls_total", (("method", label(method)), ("code", label(code))))
            self._observe("call_seconds", (("method", label(method)),), LATENCY_BUCKETS, max(seconds, 0.0))
            if decision != "ok":
                self._inc("refusals_total", (("decision", label(decision)), ("reason", label(reason))))

    def batch(self, rows: int, waits_s: Sequence[float]) -> None:
        """One forward pass of ``rows`` rows; each job's wait for a worker."""
        with self._lock:
            self._observe("batch_rows", (), ROW_BUCKETS, float(rows))
            for wait in waits_s:
                self._observe("queue_wait_seconds", (), LATENCY_BUCKETS, max(wait, 0.0))

    def count(self, name: str, by: float = 1.0) -> None:
        """A label-less counter (e.g. ``weights_integrity_failures_total``)."""
        with self._lock:
            self._inc(name, (), by)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A gauge read at snapshot time (``read`` must be cheap and never raise)."""
        with self._lock:
            self._gauges[name] = read

    def snapshot(self, boot_id: str = "", enclave_cid: int = 0) -> pb.MetricsReport:
        with self._lock:
            counters = [pb.CounterSample(name=name, labels=_labels(labels), value=value)
                        for (name, labels), value in sorted(self._counters.items())]
            histograms = [
                pb.HistogramSample(name=name, labels=_labels(labels), bounds=list(h.bounds),
                                   counts=list(h.counts), sum=h.sum, count=h.count)
                for (name, labels), h in sorted(self._histograms.items(), key=lambda kv: kv[0])
            ]
            gauges = list(self._gauges.items())
        samples = []
        for name, read in gauges:
            try:
                samples.append(pb.GaugeSample(name=name, value=float(read())))
            except Exception as err:  # a gauge never takes the report down
                log.warning("gauge %s unreadable (%s)", name, type(err).__name__)
        return pb.MetricsReport(boot_id=boot_id, enclave_cid=enclave_cid, counters=counters,
                                histograms=histograms, gauges=samples)


def _labels(labels: Labels) -> list[pb.Label]:
    return [pb.Label(name=k, value=v) for k, v in labels]


class MetricsReporter:
    """Sends ``metrics.snapshot()`` through ``send`` every ``interval_s`` (a thread) and at :meth:`stop`."""

    def __init__(self, metrics: EnclaveMetrics, send: Callable[[pb.MetricsReport], None], *,
                 boot_id: str, enclave_cid: int, interval_s: float = 5.0) -> None:
        self._metrics = metrics
        self._send = send
        self._boot_id = boot_id
        self._cid = enclave_cid
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self) -> bool:
        """Send one snapshot now; ``False`` when the parent did not take it."""
        try:
            self._send(self._metrics.snapshot(self._boot_id, self._cid))
            return True
        except Exception as err:  # the parent's I/O; figures only
            log.debug("metrics report not delivered (%s)", type(err).__name__)
            return False

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.report()

    def stop(self) -> None:
        """Stop the thread and send the final figures."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.report()
