"""Logs, metrics and alarms: encrypted log groups, the restart and key-release-failure alarms.

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
* Metrics live in the namespace ``nitrovault``. Four come from metric filters, and the patterns are the
  contract with ``parent_app`` and the enclave (documented in ``docs/deploy.md``):

  - ``EnclaveRestarts``: lines containing ``enclave ended`` in the parent's log group
    (``/nitrovault/parent``). The enclave supervisor (``parent_app.supervisor``) runs inside the parent
    process and logs ``enclave ended (exit code N, failure K); restarting in Ds`` once per restart to
    stderr, which systemd appends to ``/var/log/nitrovault/parent.log`` and the CloudWatch agent ships
    to ``/nitrovault/parent`` (``infra.constructs.enclave_host``). The enclave log group holds only the
    enclave's signed audit lines, never that line, so it is not read;
  - ``KeyReleaseFailures``: lines containing ``key release failed`` or ``KeyAccessDenied`` in either
    log group;
  - ``AuditGaps``: audit entries of kind ``gap`` (JSON filter ``{ $.kind = "gap" }``) in the enclave log
    group, where the CloudWatch agent ships the enclave's signed audit lines
    (``/var/lib/nitrovault/audit/*/audit-*.jsonl``, one canonical JSON entry per line,
    :mod:`nitrovault.audit`). A gap entry means the enclave dropped records and says so, signed;
  - ``AuditWithheld``: the parent's log line ``audit-withheld: the enclave refuses protected calls ...``
    (text filter ``"audit-withheld"``) in the parent's log group: the enclave reports it over the host
    channel (status step ``audit-withheld``, :mod:`parent_app.host_services`) when it starts refusing
    protected calls because the parent stopped storing its audit log. A compromised parent can suppress
    the line, but not the refusals: the alarm is for operators, the guarantee is in the enclave.

  Both audit alarms fire at 1 or more in 5 minutes and treat missing data as not breaching. A hostile
  parent can drop these lines before they are shipped (it stores the audit log); the alarms catch a
  failing parent, and :func:`nitrovault.audit.verify_audit` catches the hostile one.
"""

from __future__ import annotations

from collections.abc import Sequence

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
#: The supervisor's restart line (``parent_app.supervisor.Supervisor.run``), one per restart.
RESTART_PATTERN = '"enclave ended"'
KEY_RELEASE_FAILURE_PATTERN = '?"key release failed" ?"KeyAccessDenied"'
#: An audit entry of kind "gap" (``nitrovault.audit``: canonical JSON lines).
AUDIT_GAP_PATTERN = '{ $.kind = "gap" }'
#: The enclave's stdout line when it refuses protected calls because the audit log is withheld.
AUDIT_WITHHELD_PATTERN = '"audit-withheld"'
AUDIT_ALARM_PERIOD = Duration.minutes(5)
_DEFAULT_PERIOD = Duration.minutes(15)


class Observability(Construct):
    """``.key`` (logs), ``.alarm_topic_key``, ``.alarm_topic``, ``.parent_logs``, ``.enclave_logs``,
    ``.log_group(name)``, the alarms (``.restart_alarm``, ``.key_release_alarm``, ``.audit_gap_alarm``,
    ``.audit_withheld_alarm``); ``.policy`` and ``.alarm_topic_policy`` are the two keys' policies (plain
    dicts).
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
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self._retention = retention
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

        restarts = self._filter_metric("EnclaveRestarts", RESTART_PATTERN, [self.parent_logs])
        self.restart_alarm = self.alarm(
            "EnclaveRestartsAlarm",
            restarts,
            threshold=restart_threshold,
            description=f"the enclave restarted {restart_threshold} or more times in 15 minutes",
        )
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
        withheld = self._filter_metric(
            "AuditWithheld", AUDIT_WITHHELD_PATTERN, [self.parent_logs], period=AUDIT_ALARM_PERIOD
        )
        self.audit_withheld_alarm = self.alarm(
            "AuditWithheldAlarm",
            withheld,
            threshold=1,
            description="the enclave refuses protected calls: the parent withholds its audit log",
        )

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
    ) -> cloudwatch.Alarm:
        """An alarm ``metric >= threshold`` over one period that notifies ``.alarm_topic``."""
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            metric=metric,
            threshold=threshold,
            evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=missing,
            alarm_description=description,
        )
        alarm.add_alarm_action(self._alarm_action)
        return alarm
