"""The weights store: the S3 bucket that holds sealed models (and the enclave image file).

Sealed models are already encrypted under a data key that only the attested enclave can obtain; the
bucket adds defence in depth, not confidentiality against the account.

Invariants:

* SSE-KMS with this construct's own rotated "store" key (``.key``), not the model key: the model key's
  policy stays the builder's four statements, with no S3 service statement added to it.
* Versioning on, TLS-only bucket policy, all public access blocked, objects owned by the bucket owner
  (no ACLs), server access logs to a separate log bucket (SSE-S3, as S3 access logging requires).
* Grants are made here: :meth:`grant_read` for the enclave hosts, :meth:`grant_write` for the sealer.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct

SEALED_PREFIX = "models/"
ENCLAVE_IMAGE_PREFIX = "enclave/"
ARTIFACTS_PREFIX = "artifacts/"


class WeightsStore(Construct):
    """``.bucket``, ``.log_bucket``, ``.key``."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.log_bucket = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            # S3 server access logging sets the LogDeliveryWrite ACL, which needs ACLs enabled here.
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED,
            removal_policy=RemovalPolicy.RETAIN,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(400))],
        )
        self.key = kms.Key(
            self,
            "StoreKey",
            description="nitrovault: SSE-KMS for the weights store (not the model key)",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            enforce_ssl=True,
            versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.log_bucket,
            server_access_logs_prefix="weights/",
            removal_policy=RemovalPolicy.RETAIN,
        )

    def grant_read(self, grantee: iam.IGrantable) -> None:
        """Read sealed models, the enclave image and the parent's artifacts (decrypting through S3 only).

        Written out rather than ``bucket.grant_read`` so the role gets ``s3:GetObject`` on three prefixes
        and nothing else (no ``s3:List*`` / ``s3:GetBucket*``).
        """
        prefixes = (SEALED_PREFIX, ENCLAVE_IMAGE_PREFIX, ARTIFACTS_PREFIX)
        self._grant(grantee, ["s3:GetObject"], prefixes, ["kms:Decrypt"])

    def grant_write(self, grantee: iam.IGrantable) -> None:
        """Upload and read back sealed models (the sealer)."""
        self._grant(
            grantee,
            ["s3:GetObject", "s3:PutObject"],
            (SEALED_PREFIX,),
            ["kms:Decrypt", "kms:GenerateDataKey"],
        )

    def _grant(
        self,
        grantee: iam.IGrantable,
        s3_actions: list[str],
        prefixes: tuple[str, ...],
        kms_actions: list[str],
    ) -> None:
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(
                actions=s3_actions, resources=[self.bucket.arn_for_objects(f"{p}*") for p in prefixes]
            )
        )
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(
                actions=kms_actions,
                resources=[self.key.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{Stack.of(self).region}.amazonaws.com"}},
            )
        )
