"""Logs, metrics and alarms: encrypted log groups, the restart and key-release-failure alarms.

Invariants:

* Every log group is encrypted with this construct's own KMS key (``.key``, rotated) and has a finite
  retention; the key lets only the region's CloudWatch Logs service (for these log groups) and
  CloudWatch alarms (for the alarm topic) use it, besides the account's IAM.
* Metrics live in the namespace ``nitrovault``. Two come from metric filters, and the patterns are the
  contract with ``parent_app`` (documented in ``docs/deploy.md``):

  - ``EnclaveRestarts``: lines containing ``enclave ended`` (the supervisor's restart message) in the
    enclave log group (``/nitrovault/enclave``: the supervisor's output; a production enclave has no
    console);
  - ``KeyReleaseFailures``: lines containing ``key release failed`` or ``KeyAccessDenied`` in either
    log group.

* Alarms publish to one SNS topic (``.alarm_topic``) that is encrypted and TLS-only.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from constructs import Construct

NAMESPACE = "nitrovault"
RESTART_PATTERN = '"enclave ended"'
KEY_RELEASE_FAILURE_PATTERN = '?"key release failed" ?"KeyAccessDenied"'


class Observability(Construct):
    """``.key``, ``.alarm_topic``, ``.parent_logs``, ``.enclave_logs``, ``.log_group(name)``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        retention: logs.RetentionDays = logs.RetentionDays.ONE_YEAR,
        restart_threshold: int = 3,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self._retention = retention
        self.key = kms.Key(
            self,
            "LogsKey",
            description="nitrovault: encrypts CloudWatch log groups and the alarm topic",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsUse",
                principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{stack.partition}:logs:{stack.region}:{stack.account}:log-group:/nitrovault/*"
                        )
                    }
                },
            )
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublishToTopic",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
            )
        )
        self.alarm_topic = sns.Topic(self, "AlarmTopic", master_key=self.key, enforce_ssl=True)
        self._alarm_action = cw_actions.SnsAction(self.alarm_topic)

        self.parent_logs = self.log_group("ParentLogs", "/nitrovault/parent")
        self.enclave_logs = self.log_group("EnclaveLogs", "/nitrovault/enclave")

        restarts = self._filter_metric("EnclaveRestarts", RESTART_PATTERN, [self.enclave_logs])
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

    def log_group(self, construct_id: str, name: str) -> logs.LogGroup:
        """A log group under ``/nitrovault/`` encrypted with ``.key`` and with this construct's retention."""
        if not name.startswith("/nitrovault/"):
            raise ValueError("nitrovault log groups live under /nitrovault/ (the logs key policy says so)")
        return logs.LogGroup(
            self,
            construct_id,
            log_group_name=name,
            encryption_key=self.key,
            retention=self._retention,
            removal_policy=RemovalPolicy.RETAIN,
        )

    def _filter_metric(self, name: str, pattern: str, groups: list[logs.LogGroup]) -> cloudwatch.Metric:
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
            namespace=NAMESPACE, metric_name=name, statistic="Sum", period=Duration.minutes(15)
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
