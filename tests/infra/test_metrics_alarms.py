"""The parent's Prometheus metrics in CloudWatch, and the alarms that read them (docs/deploy.md, "Metrics and
alarms").

On the synthesized stack (the session's ``synth``): the parent config binds ``metrics_listen`` to
loopback and no security group opens it; the CloudWatch agent's configuration has the keys the agent's
schema allows, scrapes exactly that address, keeps only the shipped names and declares one EMF metric
for each; every metric-based alarm reads a shipped metric with its declared dimensions; the log-based
alarms are the ones with no metric equivalent.

Against the real parent code: ``parent_app.metrics.ParentMetrics`` is served on 127.0.0.1 and scraped
over HTTP, fed with a real relay's counters and a real ``enclave_app.metrics`` report; the scrape is run
through the agent's selection as its documentation describes it (relabel ``keep``, then each
``metric_declaration``'s label matcher, selectors and dimensions), and every shipped metric and every
alarm's dimension set comes out. Each check has its negative control.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from synth_context import REGION, Synth, heredoc

from enclave_app.metrics import EnclaveMetrics
from infra.constructs.enclave_host import (
    AGENT_CONFIG_PATH,
    METRICS_LISTEN,
    PARENT_CONFIG_PATH,
    PROMETHEUS_CONFIG_PATH,
    USER_DATA_LIMIT,
)
from infra.constructs.observability import (
    FLEET_LABEL,
    METRICS_LOG_GROUP,
    NAMESPACE,
    PARENT_LOG_GROUP,
    SHIPPED,
    WEIGHTS_INTEGRITY_PATTERN,
    agent_prometheus_section,
    scrape_config,
    shipped_metric,
)
from nitrovault.transport import DIRECT, TcpAddress
from parent_app.config import ParentConfig
from parent_app.metrics import STATES, EnclaveView, ParentMetrics

FLEET = "nitrovault"  # the stack's name prefix


# -- reading the synthesized boot script ---------------------------------------------------------------------


def _user_data(s: Synth) -> str:
    return s.user_data()


_file = heredoc


def _log_group_id(s: Synth, name: str) -> str:
    (found,) = [
        k for k, r in s.of_type("AWS::Logs::LogGroup").items() if r["Properties"]["LogGroupName"] == name
    ]
    return found


def _parent_config(s: Synth, tmp_path: Path) -> ParentConfig:
    path = tmp_path / "parent.json"
    path.write_text(_file(_user_data(s), PARENT_CONFIG_PATH))
    return ParentConfig.load(path)


# -- the agent's configuration -------------------------------------------------------------------------------

#: keys the CloudWatch agent's JSON schema allows (aws/amazon-cloudwatch-agent, translator/config/schema.json:
#: logs.metrics_collected.prometheus, emfProcessorDefinition, metricDeclarationDefinition; all three
#: "additionalProperties": false, so the agent refuses anything else)
PROMETHEUS_KEYS = {
    "cluster_name",
    "log_group_name",
    "prometheus_config_path",
    "emf_processor",
    "ecs_service_discovery",
    "disable_metric_extraction",
}
EMF_KEYS = {"metric_declaration_dedup", "metric_namespace", "metric_unit", "metric_declaration"}
DECLARATION_KEYS = {"source_labels", "label_matcher", "label_separator", "metric_selectors", "dimensions"}


def schema_problems(section: Mapping[str, Any]) -> list[str]:
    """What the agent's schema would refuse in a ``logs.metrics_collected.prometheus`` section."""
    problems = [f"prometheus.{k}" for k in set(section) - PROMETHEUS_KEYS]
    emf = section.get("emf_processor", {})
    problems += [f"emf_processor.{k}" for k in set(emf) - EMF_KEYS]
    for i, declaration in enumerate(emf.get("metric_declaration", [])):
        problems += [f"metric_declaration[{i}].{k}" for k in set(declaration) - DECLARATION_KEYS]
        dims = declaration.get("dimensions", [])
        if not (
            isinstance(dims, list)
            and all(isinstance(d, list) and all(isinstance(x, str) for x in d) for d in dims)
        ):
            problems.append(f"metric_declaration[{i}].dimensions is not a list of lists of labels")
    return problems


def test_the_agent_ships_the_scraped_metrics_as_emf_into_the_metrics_log_group(synth: Synth) -> None:
    script = _user_data(synth)
    agent = json.loads(_file(script, AGENT_CONFIG_PATH))
    section = agent["logs"]["metrics_collected"]["prometheus"]
    assert schema_problems(section) == []
    assert section["log_group_name"] == f"<Ref:{_log_group_id(synth, METRICS_LOG_GROUP)}>"
    assert section["prometheus_config_path"] == PROMETHEUS_CONFIG_PATH
    assert section["emf_processor"]["metric_namespace"] == NAMESPACE
    declared = [d["metric_selectors"] for d in section["emf_processor"]["metric_declaration"]]
    assert declared == [[f"^{m.name}$"] for m in SHIPPED]
    # the logs the agent already shipped are still shipped beside it
    assert agent["logs"]["logs_collected"]["files"]["collect_list"]
    # the agent loads it (fetch-config), after both files are written
    load = script.index(f"amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s -c file:{AGENT_CONFIG_PATH}")
    assert script.index(f"cat > {PROMETHEUS_CONFIG_PATH}") < load


def user_data_fits(script: str, margin: int = 2048) -> bool:
    """Whether the boot script stays under EC2's 16 KB user-data limit with ``margin`` bytes to spare (the
    rendered ``<Ref:...>`` placeholders are about as long as the names CloudFormation puts there)."""
    return len(script.encode()) + margin <= USER_DATA_LIMIT


def test_the_boot_script_with_the_metrics_configuration_fits_in_user_data(synth: Synth) -> None:
    assert user_data_fits(_user_data(synth))
    # negative control: the same script with the agent's configuration pretty-printed three times over
    agent = _file(_user_data(synth), AGENT_CONFIG_PATH)
    assert not user_data_fits(_user_data(synth) + 3 * json.dumps(json.loads(agent), indent=2))


def test_the_schema_check_refuses_what_the_agent_would(synth: Synth) -> None:
    # Negative control for the schema check above.
    section = agent_prometheus_section(FLEET, log_group_name="g", config_path="p")
    section["emf_processor"]["metric_declaration"][0]["metric_selector"] = ["typo"]
    section["scrape_interval"] = "30s"
    section["emf_processor"]["metric_declaration"][1]["dimensions"] = ["fleet"]
    assert sorted(schema_problems(section)) == [
        "metric_declaration[0].metric_selector",
        "metric_declaration[1].dimensions is not a list of lists of labels",
        "prometheus.scrape_interval",
    ]


def test_the_scrape_reads_the_parents_loopback_endpoint_and_keeps_only_the_shipped_names(
    synth: Synth,
    tmp_path: Path,
) -> None:
    config = _parent_config(synth, tmp_path)
    assert config.metrics_listen == METRICS_LISTEN and config.metrics_address == TcpAddress("127.0.0.1", 9464)
    scrape = json.loads(_file(_user_data(synth), PROMETHEUS_CONFIG_PATH))  # JSON is YAML
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"] == [{"targets": [config.metrics_listen], "labels": {FLEET_LABEL: FLEET}}]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "30s"
    (keep,) = job["metric_relabel_configs"]
    assert keep["action"] == "keep" and keep["source_labels"] == ["__name__"]
    assert set(keep["regex"].split("|")) == {m.name for m in SHIPPED}


def test_the_scrape_config_refuses_anything_but_loopback() -> None:
    for target in ("0.0.0.0:9464", "10.0.0.5:9464", "127.0.0.1", "localhost:9464"):
        with pytest.raises(ValueError, match="loopback"):
            scrape_config(target, FLEET)
    with pytest.raises(ValueError, match="fleet"):
        scrape_config(METRICS_LISTEN, "a;b")  # would break the label matcher


def test_no_security_group_opens_the_metrics_port(synth: Synth) -> None:
    port = int(METRICS_LISTEN.rsplit(":", 1)[1])
    rules = [
        r["Properties"]
        for kind in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress")
        for r in synth.of_type(kind).values()
    ]
    rules += [
        rule
        for g in synth.of_type("AWS::EC2::SecurityGroup").values()
        for rule in g["Properties"].get("SecurityGroupIngress", [])
    ]
    assert rules and not [r for r in rules if r.get("FromPort", -1) <= port <= r.get("ToPort", -1)]


def test_the_host_role_may_write_the_metrics_log_group(synth: Synth) -> None:
    group = _log_group_id(synth, METRICS_LOG_GROUP)
    (role,) = [
        k
        for k, r in synth.of_type("AWS::IAM::Role").items()
        if r["Properties"].get("RoleName") == "nitrovault-enclave-host"
    ]
    statements = [
        s
        for p in synth.of_type("AWS::IAM::Policy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]
    writes = [s for s in statements if s.get("Resource") == {"Fn::GetAtt": [group, "Arn"]}]
    assert writes and set(writes[0]["Action"]) == {"logs:CreateLogStream", "logs:PutLogEvents"}
    # no PutMetricData: EMF metrics are extracted by CloudWatch Logs, not published by the host
    assert not [s for s in statements if "cloudwatch:PutMetricData" in json.dumps(s)]


# -- the alarms ----------------------------------------------------------------------------------------------


def _alarms(s: Synth) -> dict[str, dict[str, Any]]:
    return {
        a["Properties"]["AlarmDescription"]: a["Properties"]
        for a in s.of_type("AWS::CloudWatch::Alarm").values()
    }


def _dims(alarm: Mapping[str, Any]) -> dict[str, str]:
    return {d["Name"]: d["Value"] for d in alarm.get("Dimensions", [])}


def _alarm(s: Synth, metric: str) -> dict[str, Any]:
    (found,) = [a for a in _alarms(s).values() if a["MetricName"] == metric]
    return found


def test_every_metric_alarm_reads_a_shipped_metric_with_its_declared_dimensions(synth: Synth) -> None:
    shipped = {m.name: m for m in SHIPPED}
    metric_alarms = [a for a in _alarms(synth).values() if a["MetricName"].startswith("nitrovault_")]
    assert len(metric_alarms) == 5
    (topic,) = synth.of_type("AWS::SNS::Topic")
    for alarm in metric_alarms:
        declared = shipped[alarm["MetricName"]]
        assert alarm["Namespace"] == NAMESPACE
        assert set(_dims(alarm)) == {FLEET_LABEL, *declared.dimensions} and _dims(alarm)[FLEET_LABEL] == FLEET
        assert alarm["AlarmActions"] == [{"Ref": topic}]


def test_an_alarm_cannot_read_an_unshipped_metric_or_undeclared_dimensions() -> None:
    from aws_cdk import Duration

    with pytest.raises(ValueError, match="not shipped"):
        shipped_metric(
            "nitrovault_parent_host_calls_total", FLEET, statistic="Sum", period=Duration.minutes(5)
        )
    with pytest.raises(ValueError, match="dimensions"):
        shipped_metric(
            "nitrovault_parent_enclave_state", FLEET, statistic="Maximum", period=Duration.minutes(1)
        )
    with pytest.raises(ValueError, match="dimensions"):
        shipped_metric(
            "nitrovault_parent_enclave_restarts_total",
            FLEET,
            statistic="Sum",
            period=Duration.minutes(5),
            enclave="16",
        )


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (
            "nitrovault_parent_enclave_restarts_total",
            {
                "Statistic": "Sum",
                "Period": 900,
                "Threshold": 3,
                "EvaluationPeriods": 1,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                "TreatMissingData": "notBreaching",
            },
        ),
        (
            "nitrovault_enclave_audit_withheld",
            {
                "Statistic": "Maximum",
                "Period": 300,
                "Threshold": 1,
                "EvaluationPeriods": 1,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                "TreatMissingData": "notBreaching",
            },
        ),
        (
            "nitrovault_parent_enclave_state",
            {
                "Statistic": "Maximum",
                "Period": 60,
                "Threshold": 1,
                "EvaluationPeriods": 5,
                "ComparisonOperator": "LessThanThreshold",
                "TreatMissingData": "breaching",
            },
        ),
        (
            "nitrovault_parent_relay_unreachable_total",
            {
                "Statistic": "Sum",
                "Period": 300,
                "Threshold": 10,
                "EvaluationPeriods": 1,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                "TreatMissingData": "notBreaching",
            },
        ),
        (
            "nitrovault_parent_relay_refusals_total",
            {
                "Statistic": "Sum",
                "Period": 300,
                "Threshold": 1,
                "EvaluationPeriods": 1,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold",
                "TreatMissingData": "notBreaching",
            },
        ),
    ],
    ids=["restarts", "audit-withheld", "not-serving", "relay-unreachable", "relay-at-capacity"],
)
def test_metric_alarm_settings(synth: Synth, metric: str, expected: dict[str, Any]) -> None:
    alarm = _alarm(synth, metric)
    assert {k: alarm.get(k) for k in expected} == expected
    assert not alarm.get("DatapointsToAlarm") or alarm["DatapointsToAlarm"] == alarm["EvaluationPeriods"]


def test_the_not_serving_and_capacity_alarms_watch_the_right_series(synth: Synth) -> None:
    assert _dims(_alarm(synth, "nitrovault_parent_enclave_state")) == {FLEET_LABEL: FLEET, "state": "SERVING"}
    assert "SERVING" in STATES
    assert _dims(_alarm(synth, "nitrovault_parent_relay_refusals_total")) == {
        FLEET_LABEL: FLEET,
        "reason": "max_connections",
    }


def test_restarts_and_audit_withheld_moved_from_log_filters_to_metrics(synth: Synth) -> None:
    filters = {
        f["Properties"]["MetricTransformations"][0]["MetricName"]
        for f in synth.of_type("AWS::Logs::MetricFilter").values()
    }
    # kept: no metric says the same; gone: the ones a metric now carries
    assert {"KeyReleaseFailures", "AuditGaps", "WeightsIntegrityFailures"} <= filters
    assert not {"EnclaveRestarts", "AuditWithheld"} & filters
    log_alarms = {
        a["MetricName"] for a in _alarms(synth).values() if not a["MetricName"].startswith("nitrovault_")
    }
    assert {"KeyReleaseFailures", "AuditGaps", "WeightsIntegrityFailures"} <= log_alarms


def test_weights_integrity_filter_reads_the_parent_log_group(synth: Synth) -> None:
    (found,) = [
        f["Properties"]
        for f in synth.of_type("AWS::Logs::MetricFilter").values()
        if f["Properties"]["MetricTransformations"][0]["MetricName"] == "WeightsIntegrityFailures"
    ]
    assert found["FilterPattern"] == WEIGHTS_INTEGRITY_PATTERN
    assert found["LogGroupName"] == {"Ref": _log_group_id(synth, PARENT_LOG_GROUP)}
    alarm = _alarm(synth, "WeightsIntegrityFailures")
    assert (alarm["Period"], alarm["Threshold"], alarm["Statistic"]) == (300, 1, "Sum")


def _cloudwatch_matches(pattern: str, line: str) -> bool:
    """CloudWatch Logs' match for a pattern of quoted terms (every term must occur, case-sensitively)."""
    terms = pattern.split('"')[1::2]
    assert terms and pattern == " ".join(f'"{t}"' for t in terms), "only quoted AND-terms are modelled"
    return all(t in line for t in terms)


def _status_lines(
    state: str, step: str, reason: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> list[str]:
    from nitrovault.rpc.gen.nitrovault.v1 import host_pb2
    from parent_app.host_services import HostServices
    from parent_app.host_sources import DirectoryModels, StaticCredentials

    host = HostServices(
        credentials=StaticCredentials(tmp_path / "none.json"), models=DirectoryModels(tmp_path), region=REGION
    )
    report = host_pb2.StatusReport(
        state=host_pb2.StatusReport.State.Value(state), step=step, reason=reason, enclave_cid=16
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="parent_app.host_services"):
        asyncio.run(host.ReportStatus(report, None))
    formatter = logging.Formatter(logging.BASIC_FORMAT)  # as parent_app.main's basicConfig writes stderr
    return [formatter.format(r) for r in caplog.records]


def test_the_integrity_pattern_matches_the_line_the_parent_logs_for_the_enclaves_fatal_stop(
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    import inspect

    import enclave_app.main
    import enclave_app.server

    # the enclave stops with step = the fatal reason, which the server names "weights-integrity"
    assert 'on_fatal("weights-integrity")' in inspect.getsource(enclave_app.server)
    assert "step=ending.fatal" in inspect.getsource(enclave_app.main)
    lines = _status_lines(
        "FAILED", "weights-integrity", "stopped serving: weights-integrity", caplog, tmp_path
    )
    assert [line for line in lines if _cloudwatch_matches(WEIGHTS_INTEGRITY_PATTERN, line)] == lines[-1:]
    # negative controls: another failure, and serving, do not match
    for state, step in (("FAILED", "key-release"), ("SERVING", "serving")):
        lines = _status_lines(state, step, "x", caplog, tmp_path)
        assert lines and not [line for line in lines if _cloudwatch_matches(WEIGHTS_INTEGRITY_PATTERN, line)]


# -- the real parent's /metrics, through the agent's selection -----------------------------------------------


def _scrape(metrics: ParentMetrics) -> list[tuple[str, dict[str, str], float]]:
    port = metrics.serve(TcpAddress("127.0.0.1", 0))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        metrics.close()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def agent_selects(
    samples: Iterable[tuple[str, dict[str, str], float]],
    scrape: Mapping[str, Any],
    section: Mapping[str, Any],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]:
    """The EMF datapoints the agent makes of ``samples`` (CloudWatch User Guide, "CloudWatch agent
    configuration for Prometheus"): the scrape's target labels are added and ``metric_relabel_configs``
    ``keep`` applied (Prometheus anchors its regex); then a sample becomes a datapoint of metric ``name``
    with each dimension set of every declaration whose ``label_matcher`` matches its ``source_labels``
    joined with ``;`` and one of whose ``metric_selectors`` matches the name, when it has every dimension."""
    (job,) = scrape["scrape_configs"]
    (static,) = job["static_configs"]
    (keep,) = job["metric_relabel_configs"]
    out: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
    for name, labels, value in samples:
        labels = {**labels, **static["labels"]}
        if not re.fullmatch(keep["regex"], name):
            continue
        for d in section["emf_processor"]["metric_declaration"]:
            joined = d.get("label_separator", ";").join(labels.get(label, "") for label in d["source_labels"])
            if not re.search(d["label_matcher"], joined) or not any(
                re.search(s, name) for s in d["metric_selectors"]
            ):
                continue
            for dims in d["dimensions"]:
                if all(dim in labels for dim in dims):
                    out.setdefault((name, tuple((dim, labels[dim]) for dim in dims)), []).append(value)
    return out


@pytest.fixture(scope="module")
def parent_scrape(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, str], float]]:
    """A real ParentMetrics with a real public relay (from the stack's parent config) and a real enclave
    report, scraped over HTTP."""
    from infra.constructs.enclave_host import parent_config
    from parent_app.main import public_relay

    path = tmp_path_factory.mktemp("parent") / "parent.json"
    path.write_text(
        json.dumps(
            parent_config(
                region=REGION,
                bucket_name="b",
                relay_port=50051,
                health_port=8080,
                memory_mib=4096,
                cpu_count=2,
                count=2,
            )
        )
    )
    config = ParentConfig.load(path)
    metrics = ParentMetrics()
    relay = public_relay(config, DIRECT)
    metrics.relay("public", lambda: relay.stats)
    metrics.enclaves(lambda: {16: EnclaveView("SERVING", 1, 2), 17: EnclaveView("BOOTING", 0, 1)})
    enclave = EnclaveMetrics()
    enclave.call("Predict", "OK", 0.01)
    enclave.call("Predict", "RESOURCE_EXHAUSTED", 0.001, decision="quota", reason="daily")
    enclave.count("weights_integrity_failures_total")
    enclave.gauge("audit_backlog", lambda: 3.0)
    enclave.gauge("audit_withheld", lambda: 0.0)
    assert metrics.enclave_report(16, enclave.snapshot("boot-1", 16))
    return _scrape(metrics)


def _shipping(synth: Synth) -> tuple[dict[str, Any], dict[str, Any]]:
    script = _user_data(synth)
    scrape = json.loads(_file(script, PROMETHEUS_CONFIG_PATH))
    section = json.loads(_file(script, AGENT_CONFIG_PATH))["logs"]["metrics_collected"]["prometheus"]
    return scrape, section


def test_every_shipped_metric_comes_out_of_the_real_parents_scrape(
    synth: Synth,
    parent_scrape: list[tuple[str, dict[str, str], float]],
) -> None:
    selected = agent_selects(parent_scrape, *_shipping(synth))
    names = {name for name, _ in selected}
    assert names == {m.name for m in SHIPPED}
    for _name, dims in selected:
        assert dims[0] == (FLEET_LABEL, FLEET)
    # what the parent serves but does not ship (histograms, host calls) stays out
    served = {name for name, _, _ in parent_scrape}
    assert (
        "nitrovault_parent_host_calls_total" in served or "nitrovault_enclave_call_seconds_bucket" in served
    )
    assert not {n for n in names if n.endswith(("_bucket", "_sum", "_count"))}


def test_every_alarms_series_comes_out_of_the_real_parents_scrape(
    synth: Synth,
    parent_scrape: list[tuple[str, dict[str, str], float]],
) -> None:
    selected = agent_selects(parent_scrape, *_shipping(synth))
    for alarm in _alarms(synth).values():
        if not alarm["MetricName"].startswith("nitrovault_"):
            continue
        dims = _dims(alarm)
        found = [
            values
            for (name, d), values in selected.items()
            if name == alarm["MetricName"] and dict(d) == dims
        ]
        assert found, f"no datapoint for {alarm['MetricName']} {dims}"
    # the SERVING series is 1 for the serving enclave, 0 for the booting one: Maximum 1 (not alarming)
    serving = selected[("nitrovault_parent_enclave_state", ((FLEET_LABEL, FLEET), ("state", "SERVING")))]
    assert sorted(serving) == [0.0, 1.0]


def test_the_agent_model_drops_what_does_not_match(
    synth: Synth,
    parent_scrape: list[tuple[str, dict[str, str], float]],
) -> None:
    # Negative controls for the selection above: a selector without "_total", another fleet's matcher, a
    # name the relabel step does not keep, and a dimension the series lacks all select nothing.
    scrape, section = _shipping(synth)
    broken = json.loads(json.dumps(section))
    declarations = broken["emf_processor"]["metric_declaration"]
    declarations[1]["metric_selectors"] = ["^nitrovault_parent_enclave_restarts$"]
    declarations[2]["label_matcher"] = "^other-fleet$"
    declarations[3]["dimensions"] = [[FLEET_LABEL, "enclave_id"]]
    names = {name for name, _ in agent_selects(parent_scrape, scrape, broken)}
    lost = {m.name for m in SHIPPED[1:4]}
    assert names == {m.name for m in SHIPPED} - lost
    narrow = json.loads(json.dumps(scrape))
    narrow["scrape_configs"][0]["metric_relabel_configs"][0]["regex"] = SHIPPED[0].name
    assert {name for name, _ in agent_selects(parent_scrape, narrow, section)} == {SHIPPED[0].name}
