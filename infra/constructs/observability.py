"""Logs, metrics and alarms: encrypted log groups, the parent's Prometheus metrics in CloudWatch, alarms.

Invariants:

* Every log group is encrypted with this construct's own KMS key (``.key``, rotated) and has a finite
  retention. The key's policy is exactly :func:`nitrovault.policy.build.logs_key_policy`: administrators
  manage it, and only the region's CloudWatch Logs service may use it, only for the account's
  ``/nitrovault/*`` log groups (``kms:EncryptionContext:aws:logs:arn``); nobody gets ``Decrypt`` without
  a log-group context. No statement names the account root, so IAM cannot add users of the key.
* The alarm topic (``.alarm_topic``, TLS-only) is encrypted with a second key (``.alarm_topic_key``),
  whose policy is exactly :func:`nitrovault.policy.build.alarm_topic_key_policy`: administrators, and the
  CloudWatch service principal so alarms can publish. The logs key thus serves CloudWatch Logs alone.
* Both keys are created after the administrator roles they name (``principals_created_by``).
* Metrics live in the namespace ``nitrovault``. Two kinds:

  - **Prometheus metrics** (:data:`SHIPPED`): the parent serves ``GET /metrics`` on loopback
    (``parent_app.metrics``: its own figures and the enclaves' re-exported aggregates); the CloudWatch
    agent on each host scrapes it every :data:`SCRAPE_INTERVAL_S` seconds (:func:`scrape_config`, only
    the :data:`SHIPPED` names are kept) and writes them as embedded metric format (EMF) events into
    ``/nitrovault/metrics`` (:func:`agent_prometheus_section`), from which CloudWatch extracts each
    :class:`ShippedMetric` under its Prometheus name, with the dimension ``fleet`` (the stack's name
    prefix, a label the scrape adds) and the metric's own :attr:`ShippedMetric.dimensions`. No per-host
    or per-enclave dimension: an alarm reads the fleet. Counters arrive as the delta since the previous
    scrape (the agent converts them; a series' first scrape is its baseline), gauges as read, histograms
    not at all (the agent drops them). CloudWatch User Guide, "Set up and configure Prometheus metrics
    collection on Amazon EC2 instances" and "Prometheus metric type conversion by the CloudWatch agent".
  - **Log metric filters**, where no metric says the same thing; the patterns are the contract with
    ``parent_app`` and the enclave (documented in ``docs/deploy.md``):

    - ``KeyReleaseFailures``: lines containing ``key release failed`` or ``KeyAccessDenied`` in the
      parent's and the enclave's log groups (a boot failure is a status reason, not a counted figure);
    - ``AuditGaps``: audit entries of kind ``gap`` (JSON filter ``{ $.kind = "gap" }``) in the enclave log
      group, where the CloudWatch agent ships the enclave's signed audit lines
      (``/var/lib/nitrovault/audit/*/audit-*.jsonl``, :mod:`nitrovault.audit`). A gap entry means the
      enclave dropped records and says so, signed: stronger evidence than any figure the parent reports;
    - ``WeightsIntegrityFailures``: the parent's status line for an enclave that stopped serving because
      its in-memory weight ciphertext failed to authenticate (``enclave N status FAILED
      step=weights-integrity``, :mod:`parent_app.host_services`). The enclave's own counter
      (``nitrovault_enclave_weights_integrity_failures_total``) is shipped too, but it first appears at 1
      and the enclave stops right after, so the agent's delta of its first scrape (none) never shows it.

* Alarms (each notifies ``.alarm_topic``): ``EnclaveRestarts`` (supervisor restarts, fleet-wide, >=
  ``restart_threshold`` in 15 minutes), ``AuditWithheld`` (an enclave refuses protected calls because
  the parent withholds its audit log: the gauge is 1 in 5 minutes), ``EnclavesNotServing`` (no enclave in
  the fleet reported SERVING for 5 minutes, or no host reports at all: missing data breaches),
  ``RelayUnreachable`` (>= ``unreachable_threshold`` clients closed in 5 minutes because no enclave
  could take them), ``RelayAtCapacity`` (a public relay refused clients at ``max_connections``),
  ``KeyReleaseFailures``, ``AuditGaps`` and ``WeightsIntegrityFailures`` (log filters, 1 or more). A
  hostile parent can stop reporting figures or drop log lines (it runs the metrics endpoint and stores
  the audit log); the alarms catch a failing parent, :func:`nitrovault.audit.verify_audit` and the
  CloudTrail boot count (``infra/constructs/boot_watch.py``) catch a hostile one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct, IConstruct

from infra.constructs.policy_key import key_with_exact_policy
from nitrovault.policy.build import LOG_GROUP_PREFIX, alarm_topic_key_policy, logs_key_policy

NAMESPACE = "nitrovault"
PARENT_LOG_GROUP = f"{LOG_GROUP_PREFIX}parent"
ENCLAVE_LOG_GROUP = f"{LOG_GROUP_PREFIX}enclave"
#: where the CloudWatch agent writes the scraped Prometheus metrics (EMF events)
METRICS_LOG_GROUP = f"{LOG_GROUP_PREFIX}metrics"
KEY_RELEASE_FAILURE_PATTERN = '?"key release failed" ?"KeyAccessDenied"'
#: An audit entry of kind "gap" (``nitrovault.audit``: canonical JSON lines).
AUDIT_GAP_PATTERN = '{ $.kind = "gap" }'
#: The parent's status line for an enclave stopped by a weights integrity failure
#: (``parent_app.host_services``: ``enclave N status FAILED step=weights-integrity reason=...``).
WEIGHTS_INTEGRITY_PATTERN = '"step=weights-integrity"'
AUDIT_ALARM_PERIOD = Duration.minutes(5)
_DEFAULT_PERIOD = Duration.minutes(15)

#: the label (and CloudWatch dimension) naming the fleet: the stack's name prefix
FLEET_LABEL = "fleet"
#: the scrape job's name
SCRAPE_JOB = "nitrovault-parent"
#: seconds between two scrapes of the parent's ``/metrics``
SCRAPE_INTERVAL_S = 30
_FLEET = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ShippedMetric:
    """One Prometheus metric the CloudWatch agent ships (one EMF ``metric_declaration``).

    ``name`` is the Prometheus name as the parent serves it and the CloudWatch metric name;
    ``dimensions`` are labels kept as dimensions besides ``fleet``; ``only`` keeps the series whose labels
    have these values (``{"relay": "public"}``: the clients' relay, not the host-side ones).
    """

    name: str
    dimensions: tuple[str, ...] = ()
    only: Mapping[str, str] = field(default_factory=dict)


#: What goes to CloudWatch (``parent_app/metrics.py``'s docstring lists every name the parent serves).
SHIPPED: tuple[ShippedMetric, ...] = (
    ShippedMetric("nitrovault_parent_enclave_state", dimensions=("state",)),
    ShippedMetric("nitrovault_parent_enclave_restarts_total"),
    ShippedMetric("nitrovault_parent_enclave_boots_total"),
    ShippedMetric("nitrovault_parent_draining"),
    ShippedMetric("nitrovault_parent_relay_active_connections", only={"relay": "public"}),
    ShippedMetric("nitrovault_parent_relay_refusals_total", dimensions=("reason",), only={"relay": "public"}),
    ShippedMetric("nitrovault_parent_relay_unreachable_total", only={"relay": "public"}),
    ShippedMetric("nitrovault_enclave_calls_total", dimensions=("code",)),
    ShippedMetric("nitrovault_enclave_refusals_total", dimensions=("decision",)),
    ShippedMetric("nitrovault_enclave_audit_backlog"),
    ShippedMetric("nitrovault_enclave_audit_withheld"),
    ShippedMetric("nitrovault_enclave_weights_integrity_failures_total"),
)
_SHIPPED_BY_NAME = {m.name: m for m in SHIPPED}


def check_fleet(fleet: str) -> str:
    """``fleet`` if it can be a label value, a dimension value and a literal regex (no metacharacter)."""
    if not _FLEET.fullmatch(fleet):
        raise ValueError(f"the fleet label must be 1-64 letters, digits, '_' or '-': {fleet!r}")
    return fleet


def scrape_config(target: str, fleet: str, interval_s: int = SCRAPE_INTERVAL_S) -> dict[str, Any]:
    """The agent's Prometheus scrape configuration (``prometheus_config_path``; JSON is valid YAML).

    One static target (the parent's loopback ``metrics_listen``), labelled ``fleet``; only the
    :data:`SHIPPED` names are kept (``metric_relabel_configs``), so neither histograms nor anything the
    parent adds later reach the log group unreviewed.
    """
    check_fleet(fleet)
    if not re.fullmatch(r"127\.0\.0\.1:\d{1,5}", target):
        raise ValueError(f"the agent scrapes the parent on loopback only, not {target!r}")
    interval = f"{interval_s}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": "10s"},
        "scrape_configs": [
            {
                "job_name": SCRAPE_JOB,
                "scrape_interval": interval,
                "metrics_path": "/metrics",
                "sample_limit": 10000,
                "static_configs": [{"targets": [target], "labels": {FLEET_LABEL: fleet}}],
                "metric_relabel_configs": [
                    {
                        "source_labels": ["__name__"],
                        "regex": "|".join(m.name for m in SHIPPED),
                        "action": "keep",
                    }
                ],
            }
        ],
    }


def agent_prometheus_section(fleet: str, *, log_group_name: str, config_path: str) -> dict[str, Any]:
    """``logs.metrics_collected.prometheus`` of the CloudWatch agent's configuration: where the scrape
    configuration is, where the EMF events go, and one ``metric_declaration`` per :data:`SHIPPED` metric."""
    check_fleet(fleet)
    declarations = []
    for metric in SHIPPED:
        labels = [FLEET_LABEL, *metric.only]
        declarations.append(
            {
                "source_labels": labels,
                "label_matcher": "^" + ";".join([fleet, *metric.only.values()]) + "$",
                "dimensions": [[FLEET_LABEL, *metric.dimensions]],
                "metric_selectors": [f"^{metric.name}$"],
            }
        )
    return {
        "log_group_name": log_group_name,
        "prometheus_config_path": config_path,
        "emf_processor": {"metric_namespace": NAMESPACE, "metric_declaration": declarations},
    }


def shipped_metric(
    name: str, fleet: str, *, statistic: str, period: Duration, **dimensions: str
) -> cloudwatch.Metric:
    """The CloudWatch metric of a :data:`SHIPPED` Prometheus metric, for ``fleet`` (and ``dimensions``,
    which must be the declared ones, so an alarm never reads a dimension set nothing writes)."""
    declared = _SHIPPED_BY_NAME.get(name)
    if declared is None:
        raise ValueError(f"{name} is not shipped to CloudWatch")
    if set(dimensions) != set(declared.dimensions):
        raise ValueError(f"{name} has the dimensions {declared.dimensions}, not {tuple(dimensions)}")
    return cloudwatch.Metric(
        namespace=NAMESPACE,
        metric_name=name,
        dimensions_map={FLEET_LABEL: check_fleet(fleet), **dimensions},
        statistic=statistic,
        period=period,
    )


class Observability(Construct):
    """``.key`` (logs), ``.alarm_topic_key``, ``.alarm_topic``, ``.parent_logs``, ``.enclave_logs``,
    ``.metrics_logs``, ``.fleet``, ``.log_group(name)``, the alarms (``.restart_alarm``,
    ``.key_release_alarm``, ``.audit_gap_alarm``, ``.audit_withheld_alarm``, ``.not_serving_alarm``,
    ``.unreachable_alarm``, ``.capacity_alarm``, ``.weights_integrity_alarm``); ``.policy`` and
    ``.alarm_topic_policy`` are the two keys' policies (plain dicts).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        admin_arns: Sequence[str],
        principals_created_by: Sequence[IConstruct] = (),
        retention: logs.RetentionDays = logs.RetentionDays.ONE_YEAR,
        restart_threshold: int = 3,
        unreachable_threshold: int = 10,
        fleet: str = "nitrovault",
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self._retention = retention
        self.fleet = check_fleet(fleet)
        self.policy = logs_key_policy(account_id=stack.account, region=stack.region, admin_arns=admin_arns)
        self.key = key_with_exact_policy(
            self,
            "LogsKey",
            description="nitrovault: encrypts the /nitrovault/* CloudWatch log groups",
            policy=self.policy,
            depends_on=principals_created_by,
        )
        self.alarm_topic_policy = alarm_topic_key_policy(account_id=stack.account, admin_arns=admin_arns)
        self.alarm_topic_key = key_with_exact_policy(
            self,
            "AlarmTopicKey",
            description="nitrovault: encrypts the alarm topic (CloudWatch alarms publish to it)",
            policy=self.alarm_topic_policy,
            depends_on=principals_created_by,
        )
        self.alarm_topic = sns.Topic(self, "AlarmTopic", master_key=self.alarm_topic_key, enforce_ssl=True)
        self._alarm_action = cw_actions.SnsAction(self.alarm_topic)

        self.parent_logs = self.log_group("ParentLogs", PARENT_LOG_GROUP)
        self.enclave_logs = self.log_group("EnclaveLogs", ENCLAVE_LOG_GROUP)
        self.metrics_logs = self.log_group("MetricsLogs", METRICS_LOG_GROUP)

        # -- from the parent's Prometheus metrics ------------------------------------------------------------
        self.restart_alarm = self.alarm(
            "EnclaveRestartsAlarm",
            self.metric("nitrovault_parent_enclave_restarts_total", "Sum", _DEFAULT_PERIOD),
            threshold=restart_threshold,
            description=f"enclaves restarted {restart_threshold} or more times in 15 minutes (fleet-wide)",
        )
        self.audit_withheld_alarm = self.alarm(
            "AuditWithheldAlarm",
            self.metric("nitrovault_enclave_audit_withheld", "Maximum", AUDIT_ALARM_PERIOD),
            threshold=1,
            description="an enclave refuses protected calls: the parent withholds its audit log",
        )
        self.not_serving_alarm = self.alarm(
            "EnclavesNotServingAlarm",
            self.metric("nitrovault_parent_enclave_state", "Maximum", Duration.minutes(1), state="SERVING"),
            threshold=1,
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=5,
            missing=cloudwatch.TreatMissingData.BREACHING,
            description="no enclave in the fleet reported SERVING for 5 minutes (or no host reports metrics)",
        )
        self.unreachable_alarm = self.alarm(
            "RelayUnreachableAlarm",
            self.metric("nitrovault_parent_relay_unreachable_total", "Sum", AUDIT_ALARM_PERIOD),
            threshold=unreachable_threshold,
            description=f"{unreachable_threshold} or more clients closed in 5 minutes: no enclave could "
            "take them",
        )
        self.capacity_alarm = self.alarm(
            "RelayAtCapacityAlarm",
            self.metric(
                "nitrovault_parent_relay_refusals_total", "Sum", AUDIT_ALARM_PERIOD, reason="max_connections"
            ),
            threshold=1,
            description="a host's public relay refused clients at max_connections (the fleet is full)",
        )

        # -- from log lines (no metric says the same) ------------------------------------------------------
        failures = self._filter_metric(
            "KeyReleaseFailures", KEY_RELEASE_FAILURE_PATTERN, [self.enclave_logs, self.parent_logs]
        )
        self.key_release_alarm = self.alarm(
            "KeyReleaseFailuresAlarm",
            failures,
            threshold=1,
            description="KMS refused or failed to release the model key to the enclave",
        )
        gaps = self._filter_metric(
            "AuditGaps", AUDIT_GAP_PATTERN, [self.enclave_logs], period=AUDIT_ALARM_PERIOD
        )
        self.audit_gap_alarm = self.alarm(
            "AuditGapsAlarm",
            gaps,
            threshold=1,
            description="the enclave wrote an audit gap entry: audit records were dropped (5 minutes)",
        )
        integrity = self._filter_metric(
            "WeightsIntegrityFailures",
            WEIGHTS_INTEGRITY_PATTERN,
            [self.parent_logs],
            period=AUDIT_ALARM_PERIOD,
        )
        self.weights_integrity_alarm = self.alarm(
            "WeightsIntegrityFailuresAlarm",
            integrity,
            threshold=1,
            description="an enclave stopped serving: its in-memory weight ciphertext failed to authenticate",
        )

    def metric(self, name: str, statistic: str, period: Duration, **dimensions: str) -> cloudwatch.Metric:
        """A :data:`SHIPPED` metric of this fleet (:func:`shipped_metric`)."""
        return shipped_metric(name, self.fleet, statistic=statistic, period=period, **dimensions)

    def log_group(self, construct_id: str, name: str) -> logs.LogGroup:
        """A log group under ``/nitrovault/`` encrypted with ``.key`` and with this construct's retention."""
        if not name.startswith(LOG_GROUP_PREFIX):
            raise ValueError("nitrovault log groups live under /nitrovault/ (the logs key policy says so)")
        return logs.LogGroup(
            self,
            construct_id,
            log_group_name=name,
            encryption_key=self.key,
            retention=self._retention,
            removal_policy=RemovalPolicy.RETAIN,
        )

    def _filter_metric(
        self,
        name: str,
        pattern: str,
        groups: list[logs.LogGroup],
        *,
        period: Duration = _DEFAULT_PERIOD,
    ) -> cloudwatch.Metric:
        for i, group in enumerate(groups):
            logs.MetricFilter(
                self,
                f"{name}Filter{i}",
                log_group=group,
                filter_pattern=logs.FilterPattern.literal(pattern),
                metric_namespace=NAMESPACE,
                metric_name=name,
                metric_value="1",
            )
        return cloudwatch.Metric(
            namespace=NAMESPACE, metric_name=name, statistic="Sum", period=period
        )

    def alarm(
        self,
        construct_id: str,
        metric: cloudwatch.IMetric,
        *,
        threshold: float,
        description: str,
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
        comparison: cloudwatch.ComparisonOperator = (
            cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        ),
        evaluation_periods: int = 1,
    ) -> cloudwatch.Alarm:
        """An alarm ``metric <comparison> threshold`` over ``evaluation_periods`` periods (all of them
        breaching) that notifies ``.alarm_topic``."""
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            metric=metric,
            threshold=threshold,
            evaluation_periods=evaluation_periods,
            comparison_operator=comparison,
            treat_missing_data=missing,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._alarm_action)
        return alarm
