"""The parts behind metrics, drain and several enclaves per parent, one at a time: the enclave's
aggregates, the parent's check and re-export of them, the parent's config, the enclave pool's choice,
the supervisor's drain and the enclave's ending rules."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from fakes import FakeMonotonic, run_async
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_supervisor import FakeLauncher

from enclave_app.main import MAX_DRAIN_S, _Ending
from enclave_app.metrics import LATENCY_BUCKETS, EnclaveMetrics, MetricsReporter, label
from nitrovault.errors import ConfigError
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2 as pb
from nitrovault.transport import RelayStats, VsockAddress
from parent_app.config import ParentConfig
from parent_app.host_services import EnclaveStatus
from parent_app.main import EnclavePool, _launcher
from parent_app.metrics import EnclaveView, ParentMetrics, ReportError, check_report
from parent_app.supervisor import ProcessLauncher, Supervisor, SupervisorState

BASE = {"listen": "127.0.0.1:0", "region": "us-east-1", "run_dir": "/tmp/nv-x",
        "credentials": {"kind": "static", "file": "c.json"}, "models": {"kind": "directory", "path": "m"},
        "enclave": {"kind": "process", "argv": ["enclave", "--cid", "{cid}"]}}


def _config(**overrides: object) -> ParentConfig:
    return ParentConfig(**{**BASE, **overrides})  # type: ignore[arg-type]


# -- the enclave's aggregates ----------------------------------------------------------------------------


def test_label_values_are_slugs_or_other() -> None:
    assert label("bad-signature") == "bad-signature"
    assert label("InvalidInputError") == "InvalidInputError"
    for leaky in ("alice@example.com", "a b", "x" * 49, "", None, "../etc", "Bearer abc"):
        assert label(leaky) == "other"


def test_calls_refusals_and_histograms_are_counted() -> None:
    metrics = EnclaveMetrics()
    metrics.call("Infer", "OK", 0.004)
    metrics.call("Infer", "OK", 0.2)
    metrics.call("Infer", "UNAUTHENTICATED", 0.001, decision="denied", reason="bad-signature")
    metrics.call("Embed", "RESOURCE_EXHAUSTED", 0.001, decision="quota", reason="subject alice@x")
    metrics.batch(3, [0.001, 0.002, 0.0])
    metrics.gauge("audit_backlog", lambda: 7)
    report = metrics.snapshot("ab" * 8, 17)
    assert report.boot_id == "ab" * 8 and report.enclave_cid == 17
    counters = {(c.name, tuple((x.name, x.value) for x in c.labels)): c.value for c in report.counters}
    assert counters[("calls_total", (("method", "Infer"), ("code", "OK")))] == 2
    assert counters[("refusals_total", (("decision", "denied"), ("reason", "bad-signature")))] == 1
    assert counters[("refusals_total", (("decision", "quota"), ("reason", "other")))] == 1  # free text
    assert b"alice" not in report.SerializeToString()
    latency = next(h for h in report.histograms if h.name == "call_seconds" and h.labels[0].value == "Infer")
    assert latency.count == 3 and sum(latency.counts) == 3 and len(latency.counts) == len(LATENCY_BUCKETS) + 1
    assert latency.counts[LATENCY_BUCKETS.index(0.005)] == 1  # 0.004 s lands in the 5 ms bucket
    rows = next(h for h in report.histograms if h.name == "batch_rows")
    assert rows.count == 1 and rows.sum == 3.0
    assert [g.value for g in report.gauges if g.name == "audit_backlog"] == [7.0]
    check_report(report)  # what the enclave sends is what the parent accepts


def test_a_broken_gauge_or_parent_never_breaks_serving() -> None:
    metrics = EnclaveMetrics()
    metrics.gauge("audit_backlog", lambda: 1 / 0)
    assert not metrics.snapshot().gauges  # the gauge is left out, the report still goes
    sent: list[pb.MetricsReport] = []

    def refuse(report: pb.MetricsReport) -> None:
        raise ConnectionError("the parent does not listen")

    assert MetricsReporter(metrics, refuse, boot_id="", enclave_cid=16).report() is False
    assert MetricsReporter(metrics, sent.append, boot_id="", enclave_cid=16).report() is True
    assert len(sent) == 1


# -- the parent's check and re-export ----------------------------------------------------------------------


def _report(**extra: object) -> pb.MetricsReport:
    metrics = EnclaveMetrics()
    metrics.call("Infer", "OK", 0.01)
    report = metrics.snapshot("cd" * 8, 16)
    for key, value in extra.items():
        getattr(report, key).append(value)
    return report


@pytest.mark.parametrize(("extra", "why"), [
    ({"counters": pb.CounterSample(name="Bad-Name", value=1)}, "name"),
    ({"counters": pb.CounterSample(name="x", labels=[pb.Label(name="who", value="a b")], value=1)}, "label"),
    ({"counters": pb.CounterSample(name="x", labels=[pb.Label(name="enclave", value="16")], value=1)},
     "label"),
    ({"histograms": pb.HistogramSample(name="h", bounds=[1.0], counts=[1, 1], count=3)}, "add up"),
    ({"histograms": pb.HistogramSample(name="h", bounds=[2.0, 1.0], counts=[0, 0, 0], count=0)}, "add up"),
    ({"histograms": pb.HistogramSample(name="h", bounds=[1.0], counts=[1], count=1)}, "add up"),
    ({"gauges": pb.GaugeSample(name="calls_total", value=1)}, "kinds or label sets"),
])
def test_a_malformed_report_is_refused_and_dropped(extra: dict[str, object], why: str) -> None:
    report = _report(**extra)
    with pytest.raises(ReportError, match=why):
        check_report(report)
    parent = ParentMetrics()
    assert parent.enclave_report(16, report) is False
    assert parent.dropped_reports == 1
    assert "nitrovault_enclave_calls_total" not in generate_latest(parent.registry).decode()


def test_too_many_series_are_refused() -> None:
    report = _report()
    for i in range(600):
        report.gauges.append(pb.GaugeSample(name=f"g{i}", value=1))
    with pytest.raises(ReportError, match="series"):
        check_report(report)


def test_the_parent_reexports_each_enclaves_figures_with_its_cid() -> None:
    parent = ParentMetrics()
    assert parent.enclave_report(16, _report())
    assert parent.enclave_report(17, _report())
    parent.relay("public", lambda: RelayStats(active=2, total=9, refused=1, failed=3, idle_closed=0,
                                              bytes_up=100, bytes_down=200, refused_by_reason={"not_tls": 1}))
    parent.enclaves(lambda: {16: EnclaveView("SERVING", 0, 1), 17: EnclaveView("RESTARTING", 2, 3)})
    parent.host_call("ReportStatus", "OK")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(parent.registry).decode())
               for s in f.samples}
    for cid in ("16", "17"):
        key = ("nitrovault_enclave_calls_total", (("code", "OK"), ("enclave", cid), ("method", "Infer")))
        assert samples[key] == 1
        bucket = ("nitrovault_enclave_call_seconds_bucket", (("enclave", cid), ("le", "+Inf"),
                                                             ("method", "Infer")))
        assert samples[bucket] == 1  # cumulative: +Inf holds every observation
    assert samples[("nitrovault_parent_relay_unreachable_total", (("relay", "public"),))] == 3
    refusals = ("nitrovault_parent_relay_refusals_total", (("reason", "not_tls"), ("relay", "public")))
    assert samples[refusals] == 1
    assert samples[("nitrovault_parent_enclave_state", (("enclave", "17"), ("state", "RESTARTING")))] == 1
    assert samples[("nitrovault_parent_enclave_state", (("enclave", "17"), ("state", "SERVING")))] == 0
    assert samples[("nitrovault_parent_enclave_restarts_total", (("enclave", "17"),))] == 2
    assert samples[("nitrovault_parent_host_calls_total", (("code", "OK"), ("method", "ReportStatus")))] == 1


# -- config, choice, supervision ------------------------------------------------------------------------


def test_enclave_count_and_addresses_are_checked() -> None:
    config = _config(enclave={**BASE["enclave"], "count": 3}, enclave_cid=20)  # type: ignore[dict-item]
    assert config.enclave_cids == (20, 21, 22)
    for bad in (0, 17, True, "2"):
        with pytest.raises(ConfigError, match=r"enclave\.count"):
            _config(enclave={**BASE["enclave"], "count": bad})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="enclave_cid"):
        _config(enclave_cid=3)
    with pytest.raises(ConfigError, match="metrics_listen must be another address than listen"):
        _config(listen="127.0.0.1:9000", metrics_listen="127.0.0.1:9000")
    with pytest.raises(ConfigError, match="drain_timeout_s"):
        _config(drain_timeout_s=0)
    assert _config(metrics_listen="127.0.0.1:9464").metrics_address is not None


def test_each_process_enclave_gets_its_own_cid_or_the_config_is_refused() -> None:
    config = _config(enclave={**BASE["enclave"], "count": 2})  # type: ignore[dict-item]
    launcher = _launcher(config, 17)
    assert isinstance(launcher, ProcessLauncher) and launcher.argv == ["enclave", "--cid", "17"]
    shared = _config(enclave={"kind": "process", "argv": ["enclave"], "count": 2})
    with pytest.raises(ConfigError, match="cid"):
        _launcher(shared, 16)


class _Host:
    def __init__(self, serving: list[int]) -> None:
        self._serving = serving

    def serving(self) -> list[int]:
        return self._serving


def test_the_pool_sends_a_client_to_the_serving_enclave_with_fewest_connections() -> None:
    a, b = VsockAddress(16, 5000), VsockAddress(17, 5000)
    assert EnclavePool(_Host([]), 5000).choose({}) is None  # nobody serves: the client is closed at once
    pool = EnclavePool(_Host([16, 17]), 5000)  # type: ignore[arg-type]
    assert pool.choose({a: 3, b: 1}) == b
    assert pool.choose({a: 0, b: 5}) == a
    assert {pool.choose({}) for _ in range(4)} == {a, b}  # ties take turns
    assert EnclavePool(_Host([17]), 5000).choose({b: 9}) == b  # type: ignore[arg-type]


@run_async
async def test_drain_restarts_nothing_and_waits_for_the_enclave_to_end() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [])  # runs until stopped
    sup = Supervisor(launcher, clock=clock, sleep=clock.sleep)
    task = asyncio.create_task(sup.run())
    while sup.state is not SupervisorState.RUNNING:
        await asyncio.sleep(0)
    draining = asyncio.create_task(sup.drain(3600.0))
    await asyncio.sleep(0)
    assert not draining.done()
    launcher._release[0].set()  # the enclave drained and exited on its own
    assert await draining is True
    assert launcher.starts == 1 and launcher.stopped == []  # not restarted, not stopped
    assert sup.state is SupervisorState.STOPPED
    await task


@run_async
async def test_drain_stops_an_enclave_that_cannot_be_told() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [])
    sup = Supervisor(launcher, clock=clock, sleep=clock.sleep)
    task = asyncio.create_task(sup.run())
    while sup.state is not SupervisorState.RUNNING:
        await asyncio.sleep(0)
    assert await sup.drain(0.0) is False
    assert launcher.stopped == [0] and launcher.starts == 1
    await task


def test_a_drain_deadline_is_clamped_and_a_fatal_error_wins() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        huge = _Ending()
        huge.drain(1e9, stop)
        assert stop.is_set() and huge.draining and huge.grace == MAX_DRAIN_S
        for bad, grace in ((-5.0, 0.0), (math.nan, 2.0), (math.inf, 2.0)):
            ending = _Ending()
            ending.drain(bad, asyncio.Event())
            assert ending.grace == grace
        fatal = _Ending()
        fatal.drain(30.0, asyncio.Event())
        fatal.fail("weights-integrity", asyncio.Event())
        fatal.drain(30.0, asyncio.Event())  # a later DRAIN cannot give tampered memory more time
        assert fatal.fatal == "weights-integrity" and fatal.grace == 0.0

    asyncio.run(main())


def test_the_summary_status_prefers_an_enclave_that_takes_calls() -> None:
    from parent_app.host_services import HostServices
    from parent_app.host_sources import DirectoryModels, StaticCredentials

    host = HostServices(credentials=StaticCredentials(Path("/nonexistent")),
                        models=DirectoryModels(Path("/nonexistent")),
                        region="us-east-1", cids=(16, 17))
    host.enclaves[17] = EnclaveStatus("SERVING", "", "", 0.0, 2, 17)
    host.enclaves[16] = EnclaveStatus("FAILED", "x", "boot", 0.0, 1, 16)
    assert host.status.state == "SERVING" and host.status.boots == 3 and host.serving() == [17]
    host.mark("RESTARTING", cid=17)
    assert host.status.state == "FAILED" and host.serving() == []
    with pytest.raises(ConfigError):
        HostServices(credentials=StaticCredentials(Path("/x")),
                     models=DirectoryModels(Path("/x")), region="r", cids=(16, 16))
