"""The identity canary: a scheduled Lambda that tries ``kms:Decrypt`` on the model key from outside any
enclave and alarms if it ever succeeds (code in :mod:`infra.canary.handler`).

Invariants:

* The canary's role (explicit name) has ``kms:Decrypt`` on the model key in its *IAM* policy, and is
  not named in the key policy: only the key policy can (and must) refuse it. That is the proof.
* The breach alarm fires on one successful decrypt, and also when the canary stops reporting
  (missing data is breaching: silence proves nothing).
* The function logs to an encrypted log group with retention; it has no VPC (it is "anyone in the
  account", not a host).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from constructs import Construct

from infra.constructs.observability import NAMESPACE, Observability

CODE_DIR = Path(__file__).resolve().parents[1] / "canary"


class IdentityCanary(Construct):
    """``.function``, ``.role``, ``.rule``, ``.breach_alarm``, ``.inconclusive_alarm``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        model_key_arn: str,
        role_name: str,
        observability: Observability,
        encryption_context: Mapping[str, str],
        ciphertext_b64: str = "",
        schedule: events.Schedule | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        log_group = observability.log_group("CanaryLogs", "/nitrovault/identity-canary")
        self.role = iam.Role(
            self,
            "Role",
            role_name=role_name,
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description="nitrovault identity canary: must NEVER be able to decrypt with the model key",
        )
        # Allowed by IAM on purpose: only the key policy may stop this role.
        self.role.add_to_policy(iam.PolicyStatement(actions=["kms:Decrypt"], resources=[model_key_arn]))
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringEquals": {"cloudwatch:namespace": NAMESPACE}},
            )
        )
        log_group.grant_write(self.role)
        self.function = lambda_.Function(
            self,
            "Function",
            runtime=lambda_.Runtime.PYTHON_3_14,
            handler="handler.handler",
            code=lambda_.Code.from_asset(str(CODE_DIR), exclude=["__pycache__", "*.pyc", "__init__.py"]),
            role=self.role,
            timeout=Duration.seconds(30),
            memory_size=128,
            log_group=log_group,
            environment={
                "MODEL_KEY_ARN": model_key_arn,
                "CANARY_CIPHERTEXT_B64": ciphertext_b64,
                "CANARY_ENCRYPTION_CONTEXT": json.dumps(dict(encryption_context), sort_keys=True),
                "METRIC_NAMESPACE": NAMESPACE,
            },
        )
        self.rule = events.Rule(
            self,
            "Schedule",
            schedule=schedule or events.Schedule.rate(Duration.hours(1)),
            targets=[targets.LambdaFunction(self.function, retry_attempts=2)],
        )
        self.breach_alarm = observability.alarm(
            "DecryptSucceededAlarm",
            cloudwatch.Metric(
                namespace=NAMESPACE,
                metric_name="CanaryDecryptSucceeded",
                statistic="Maximum",
                period=Duration.hours(1),
            ),
            threshold=1,
            description="Decrypt with the model key worked outside any enclave (or the canary is silent)",
            missing=cloudwatch.TreatMissingData.BREACHING,
        )
        self.inconclusive_alarm = observability.alarm(
            "CanaryInconclusiveAlarm",
            cloudwatch.Metric(
                namespace=NAMESPACE,
                metric_name="CanaryInconclusive",
                statistic="Minimum",
                period=Duration.hours(3),
            ),
            threshold=1,
            description="The identity canary could not reach a verdict for 3 hours (it proves nothing now)",
        )
