"""The weights store: the S3 bucket that holds sealed models (and the enclave image file).

Sealed models are already encrypted under a data key that only the attested enclave can obtain; the
bucket adds defence in depth, not confidentiality against the account.

Invariants:

* SSE-KMS with Bucket Keys under this construct's own rotated "store" key (``.key``), not the model key:
  the model key's policy stays the builder's four statements, with no S3 service statement added to it.
* The store key's policy is exactly :func:`nitrovault.policy.build.store_key_policy`: administrators
  manage it (never use it), ``writer_arns`` may ``GenerateDataKey`` and ``Decrypt``, ``reader_arns`` may
  ``Decrypt``, both only through S3 (``kms:ViaService``) and only with this bucket's S3 encryption
  context, and everyone is denied any cryptographic call that S3 does not make. No statement names the
  account root, so IAM policies cannot add users of the key: the key policy alone decides, and the
  grants below give S3 permissions only.
* The bucket has an explicit name (``bucket_name``): the key policy names the bucket's ARN, and the bucket
  names the key, so a reference (``Fn::GetAtt``) either way would be a circular dependency.
* Versioning on, TLS-only bucket policy, all public access blocked, objects owned by the bucket owner
  (no ACLs), server access logs to a separate log bucket (SSE-S3, as S3 access logging requires; it never
  uses the store key).
* S3 grants are made here: :meth:`grant_read` for the enclave hosts (who must be in ``reader_arns``),
  :meth:`grant_write` for the sealer (who must be in ``writer_arns``): the sealer publishes everything
  the hosts fetch (sealed models, the enclave image, the parent's wheelhouse).
* The key must exist after the roles its policy names (KMS refuses unknown principals): the stack adds
  ``store.key.node.add_dependency(role.node.default_child)`` for each.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.constructs.policy_key import key_with_exact_policy
from nitrovault.policy.build import store_key_policy

SEALED_PREFIX = "models/"
ENCLAVE_IMAGE_PREFIX = "enclave/"
ARTIFACTS_PREFIX = "artifacts/"


class WeightsStore(Construct):
    """``.bucket``, ``.log_bucket``, ``.key`` and ``.policy`` (the store key's policy, a plain dict)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        bucket_name: str,
        account_id: str,
        region: str,
        admin_arns: Sequence[str],
        writer_arns: Sequence[str],
        reader_arns: Sequence[str],
    ) -> None:
        super().__init__(scope, construct_id)
        self.policy = store_key_policy(
            account_id=account_id,
            region=region,
            admin_arns=admin_arns,
            writer_arns=writer_arns,
            reader_arns=reader_arns,
            bucket_name=bucket_name,
        )
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
        self.key = key_with_exact_policy(
            self,
            "StoreKey",
            description="nitrovault: SSE-KMS for the weights store (not the model key)",
            policy=self.policy,
        )
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            bucket_name=bucket_name,
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
        """Read sealed models, the enclave image and the parent's artifacts (S3 decrypts them with the
        store key, which must list the grantee in ``reader_arns``).

        Written out rather than ``bucket.grant_read`` so the role gets ``s3:GetObject`` on three prefixes
        and nothing else (no ``s3:List*`` / ``s3:GetBucket*``, and no KMS statement: the key policy
        decides, and IAM cannot add users to a key whose policy does not delegate to the account).
        """
        self._grant(grantee, ["s3:GetObject"])

    def grant_write(self, grantee: iam.IGrantable) -> None:
        """Upload (and read back) sealed models, the enclave image and the parent's artifacts: the sealer,
        which the store key must list in ``writer_arns``."""
        self._grant(grantee, ["s3:GetObject", "s3:PutObject"])

    def _grant(self, grantee: iam.IGrantable, s3_actions: list[str]) -> None:
        prefixes = (SEALED_PREFIX, ENCLAVE_IMAGE_PREFIX, ARTIFACTS_PREFIX)
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(
                actions=s3_actions, resources=[self.bucket.arn_for_objects(f"{p}*") for p in prefixes]
            )
        )
