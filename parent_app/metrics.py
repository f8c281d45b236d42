"""The parent's Prometheus metrics (``prometheus-client``), on ``metrics_listen`` at ``GET /metrics``.

Two sources, one registry (never the process-global one, so tests and several parents do not mix):

* the parent's own figures, read at scrape time: each relay's counters (:class:`RelayStats`: connections,
  bytes, refusals by reason), each enclave's supervision (state, restarts, boots) and the host-service
  calls the enclaves made (by method and gRPC status);
* the enclaves' aggregates (``enclave_app.metrics``), re-exported as the latest report of each enclave
  with an ``enclave`` label (its vsock CID). The parent only forwards what the enclave chose to send:
  counters and histograms over closed label sets, never a subject, input or output. A report is
  checked before it is kept (names and label values are slugs, histogram shapes add up), so a malformed
  one is dropped, not exported.

Names (all prefixed ``nitrovault_``)::

    parent_relay_connections_total{relay}        parent_relay_active_connections{relay}
    parent_relay_bytes_total{relay,direction}    parent_relay_refusals_total{relay,reason}
    parent_relay_unreachable_total{relay}        parent_enclave_state{enclave,state}   (1 for the current)
    parent_enclave_restarts_total{enclave}       parent_enclave_boots_total{enclave}
    parent_host_calls_total{method,code}         parent_draining
    enclave_<name>{enclave,...}                  (enclave_app.metrics: calls, latency, batches, refusals)

The CDK app's CloudWatch agent scrapes the endpoint on loopback and sends the figures as embedded
metric format logs (``infra/constructs/enclave_host.py``); the alarms in ``infra/constructs/observability.py``
use them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.transport import RelayStats, TcpAddress

log = logging.getLogger(__name__)

PREFIX = "nitrovault_"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,48}")
#: the supervisor and reported states an enclave can be in (one gauge series each)
STATES = ("BOOTING", "SERVING", "DEGRADED", "FAILED", "RESTARTING", "DRAINING", "STOPPED")
#: series one enclave report may carry at most (a bound on what the parent keeps and exports)
MAX_SERIES = 512


class ReportError(ValueError):
    """A metrics report that cannot be exported as is (it is dropped)."""


@dataclass(frozen=True)
class EnclaveView:
    """What the collector reads of one enclave at scrape time."""

    state: str
    restarts: int
    boots: int


def check_report(report: pb.MetricsReport) -> pb.MetricsReport:
    """``report`` if every name, label and histogram in it is well-formed, else :class:`ReportError`."""
    series = len(report.counters) + len(report.histograms) + len(report.gauges)
    if series > MAX_SERIES:
        raise ReportError(f"{series} series (bound {MAX_SERIES})")
    for sample in (*report.counters, *report.histograms, *report.gauges):
        if not _NAME.fullmatch(sample.name):
            raise ReportError("malformed metric name")
        for label in getattr(sample, "labels", ()):
            good = _NAME.fullmatch(label.name) and _VALUE.fullmatch(label.value)
            if not good or label.name == "enclave":
                raise ReportError("malformed label")
    shapes: dict[str, tuple[str, tuple[str, ...]]] = {}
    for kind, samples in (("counter", report.counters), ("histogram", report.histograms),
                          ("gauge", report.gauges)):
        for sample in samples:
            shape = (kind, tuple(label.name for label in getattr(sample, "labels", ())))
            if shapes.setdefault(sample.name, shape) != shape:
                raise ReportError(f"metric {sample.name} with several kinds or label sets")
    for h in report.histograms:
        bounds = list(h.bounds)
        if len(h.counts) != len(bounds) + 1 or bounds != sorted(set(bounds)) or sum(h.counts) != h.count:
            raise ReportError(f"histogram {h.name} does not add up")
    return report


class ParentMetrics:
    """The registry behind ``/metrics``; the parent's parts hand in read functions and reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._relays: dict[str, Callable[[], RelayStats]] = {}
        self._enclaves: Callable[[], Mapping[int, EnclaveView]] = dict
        self._draining: Callable[[], bool] = lambda: False
        self._host_calls: dict[tuple[str, str], int] = {}
        self._reports: dict[int, pb.MetricsReport] = {}
        self.dropped_reports = 0
        self.registry.register(_Collector(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- inputs ------------------------------------------------------------------------------------------

    def relay(self, name: str, stats: Callable[[], RelayStats]) -> None:
        self._relays[name] = stats

    def enclaves(self, views: Callable[[], Mapping[int, EnclaveView]]) -> None:
        self._enclaves = views

    def draining(self, read: Callable[[], bool]) -> None:
        self._draining = read

    def host_call(self, method: str, code: str) -> None:
        with self._lock:
            self._host_calls[(method, code)] = self._host_calls.get((method, code), 0) + 1

    def enclave_report(self, cid: int, report: pb.MetricsReport) -> bool:
        """Keep ``report`` as enclave ``cid``'s latest figures; ``False`` (dropped) if malformed."""
        try:
            check_report(report)
        except ReportError as err:
            log.warning("dropped a metrics report of enclave %d: %s", cid, err)
            with self._lock:
                self.dropped_reports += 1
            return False
        with self._lock:
            self._reports[cid] = report
        return True

    # -- the endpoint ------------------------------------------------------------------------------------

    def serve(self, address: TcpAddress) -> int:
        """Serve ``GET /metrics`` on ``address`` from a thread; returns the bound port."""
        self._server, self._thread = start_http_server(address.port, address.host, registry=self.registry)
        port: int = self._server.server_address[1]
        log.info("metrics endpoint on %s:%d", address.host, port)
        return port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- collection --------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield from self._relay_metrics()
        yield from self._enclave_metrics()
        with self._lock:
            calls = dict(self._host_calls)
            reports = dict(self._reports)
            dropped = self.dropped_reports
        host = CounterMetricFamily(PREFIX + "parent_host_calls", "host-service calls the enclaves made",
                                   labels=["method", "code"])
        for (method, code), n in sorted(calls.items()):
            host.add_metric([method, code], n)
        yield host
        yield CounterMetricFamily(PREFIX + "parent_dropped_metric_reports",
                                  "enclave metric reports dropped as malformed", value=dropped)
        yield GaugeMetricFamily(PREFIX + "parent_draining", "1 while the parent drains",
                                value=1.0 if self._draining() else 0.0)
        yield from _reexport(reports)

    def _relay_metrics(self) -> Iterator[Metric]:
        connections = CounterMetricFamily(PREFIX + "parent_relay_connections", "connections admitted",
                                          labels=["relay"])
        active = GaugeMetricFamily(PREFIX + "parent_relay_active_connections", "connections relayed now",
                                   labels=["relay"])
        moved = CounterMetricFamily(PREFIX + "parent_relay_bytes", "bytes relayed (ciphertext)",
                                    labels=["relay", "direction"])
        refusals = CounterMetricFamily(PREFIX + "parent_relay_refusals", "connections refused or closed by "
                                       "admission or the TLS handshake guard", labels=["relay", "reason"])
        unreachable = CounterMetricFamily(PREFIX + "parent_relay_unreachable", "connections closed because "
                                          "no target (enclave) could be reached", labels=["relay"])
        for name, read in sorted(self._relays.items()):
            stats = read()
            connections.add_metric([name], stats.total)
            active.add_metric([name], stats.active)
            moved.add_metric([name, "up"], stats.bytes_up)
            moved.add_metric([name, "down"], stats.bytes_down)
            unreachable.add_metric([name], stats.failed)
            for reason, n in sorted(stats.refused_by_reason.items()):
                refusals.add_metric([name, reason], n)
        yield from (connections, active, moved, refusals, unreachable)

    def _enclave_metrics(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(PREFIX + "parent_enclave_state", "1 for the enclave's current state",
                                  labels=["enclave", "state"])
        restarts = CounterMetricFamily(PREFIX + "parent_enclave_restarts", "enclave restarts by the "
                                       "supervisor", labels=["enclave"])
        boots = CounterMetricFamily(PREFIX + "parent_enclave_boots", "enclave boots (one attested KMS "
                                    "Decrypt each)", labels=["enclave"])
        for cid, view in sorted(self._enclaves().items()):
            for name in STATES:
                state.add_metric([str(cid), name], 1.0 if view.state == name else 0.0)
            restarts.add_metric([str(cid)], view.restarts)
            boots.add_metric([str(cid)], view.boots)
        yield from (state, restarts, boots)


def _reexport(reports: Mapping[int, pb.MetricsReport]) -> Iterator[Metric]:
    """The enclaves' latest reports as metric families, one series per enclave and label set."""
    families: dict[str, tuple[Metric, tuple[str, ...]]] = {}

    def family(kind: type[Any], name: str, labels: Iterable[str]) -> Any:
        """The family for ``name``; a sink for a sample whose kind or labels differ from the first one's
        (another enclave version): the family's shape stays what the first report said."""
        full, wanted = PREFIX + "enclave_" + name.removesuffix("_total"), ("enclave", *labels)
        found = families.get(full)
        if found is None:
            found = families[full] = (kind(full, f"enclave {name}", labels=list(wanted)), wanted)
        metric, shape = found
        return metric if isinstance(metric, kind) and shape == wanted else _Discard()

    for cid, report in sorted(reports.items()):
        for c in report.counters:
            names = [label.name for label in c.labels]
            family(CounterMetricFamily, c.name, names).add_metric(
                [str(cid), *(label.value for label in c.labels)], c.value)
        for g in report.gauges:
            family(GaugeMetricFamily, g.name, []).add_metric([str(cid)], g.value)
        for h in report.histograms:
            names = [label.name for label in h.labels]
            buckets, running = [], 0
            for bound, n in zip([*h.bounds, float("inf")], h.counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
            family(HistogramMetricFamily, h.name, names).add_metric(
                [str(cid), *(label.value for label in h.labels)], buckets=buckets, sum_value=h.sum)
    yield from (metric for metric, _ in families.values())


class _Discard:
    def add_metric(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Collector(Collector):
    def __init__(self, metrics: ParentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.collect()
