"""Boots are visible: one attested ``Decrypt`` of the model key per enclave boot, counted and alarmed.

Every enclave boot makes exactly one KMS ``Decrypt`` with a ``Recipient`` (the attestation document) for
the model key. CloudTrail records such a call with ``additionalEventData.recipient`` holding the
attestation document's ``attestationDocumentModuleId`` (the enclave id), image digest and PCRs (AWS KMS
Developer Guide, "Monitoring requests for Nitro enclaves", ``ct-nitro-enclave``). The metric filter
matches ``eventSource``, ``eventName``, the model key's ARN in ``resources[0].ARN`` and the presence of
that recipient field, so un-attested ``Decrypt`` calls (which the key policy denies anyway) do not count.

Invariants: the metric is ``nitrovault/AttestedModelKeyDecrypts`` (Sum over 1 hour); the alarm fires at
``>= threshold`` in one hour and notifies the stack's alarm topic. The trail is created here only when no
existing trail log group is given (context ``cloudTrailLogGroup``); it records management read events
(``Decrypt`` is one) into ``/nitrovault/cloudtrail``, encrypted with the logs key like every log group.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudtrail as cloudtrail
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.constructs.observability import NAMESPACE, Observability

METRIC_NAME = "AttestedModelKeyDecrypts"
TRAIL_LOG_GROUP = "/nitrovault/cloudtrail"
#: the CloudTrail field KMS fills for a Decrypt with a Nitro Enclaves Recipient (ct-nitro-enclave)
RECIPIENT_FIELD = "$.additionalEventData.recipient.attestationDocumentModuleId"


def boot_filter_pattern(model_key_arn: str) -> str:
    return (
        '{ ($.eventSource = "kms.amazonaws.com") && ($.eventName = "Decrypt") && '
        f'($.resources[0].ARN = "{model_key_arn}") && ({RECIPIENT_FIELD} = *) }}'
    )


class BootWatch(Construct):
    """``.log_group`` (the trail's), ``.trail`` (None when an existing log group was given), ``.metric``,
    ``.alarm``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        observability: Observability,
        model_key_arn: str,
        threshold: int,
        access_log_bucket: s3.IBucket,
        existing_log_group: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if threshold < 1:
            raise ValueError(f"the boot alarm threshold must be at least 1, not {threshold}")
        self.trail: cloudtrail.Trail | None = None
        self.log_group: logs.ILogGroup
        if existing_log_group:
            self.log_group = logs.LogGroup.from_log_group_name(self, "TrailLogs", existing_log_group)
        else:
            group = observability.log_group("TrailLogs", TRAIL_LOG_GROUP)
            bucket = s3.Bucket(
                self,
                "TrailBucket",
                encryption=s3.BucketEncryption.S3_MANAGED,
                enforce_ssl=True,
                block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
                versioned=True,
                server_access_logs_bucket=access_log_bucket,
                server_access_logs_prefix="cloudtrail-bucket/",
            )
            self.trail = cloudtrail.Trail(
                self,
                "Trail",
                bucket=bucket,
                send_to_cloud_watch_logs=True,
                cloud_watch_log_group=group,
                management_events=cloudtrail.ReadWriteType.READ_ONLY,
                include_global_service_events=False,
                is_multi_region_trail=False,
                enable_file_validation=True,
            )
            self.log_group = group
        self.filter = logs.MetricFilter(
            self,
            "BootFilter",
            log_group=self.log_group,
            filter_pattern=logs.FilterPattern.literal(boot_filter_pattern(model_key_arn)),
            metric_namespace=NAMESPACE,
            metric_name=METRIC_NAME,
            metric_value="1",
        )
        self.metric = cloudwatch.Metric(
            namespace=NAMESPACE, metric_name=METRIC_NAME, statistic="Sum", period=Duration.hours(1)
        )
        self.alarm = observability.alarm(
            "BootsAlarm",
            self.metric,
            threshold=threshold,
            description=f"{threshold} or more attested model-key Decrypts (enclave boots) in one hour",
        )
