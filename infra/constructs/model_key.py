"""The model key: a KMS key whose whole policy comes from :func:`nitrovault.policy.build.model_key_policy`.

Invariants:

* The key policy is exactly the builder's output: administrators manage but never use the key, the
  sealer may only ``GenerateDataKey`` with the model's encryption context, the enclave host role may only
  ``Decrypt`` with ``kms:RecipientAttestation:PCRn`` conditions equal to the manifest's PCRs, and an
  explicit deny refuses ``Decrypt`` without attestation. No statement names the account root: CDK's
  default key policy (``arn:aws:iam::ACCOUNT:root`` with ``kms:*``) is never added, because the policy
  is passed in at construction and no ``grant*`` method is ever called on this key (grants would append
  statements to it).
* The synthesized ``KeyPolicy`` is the builder's dict verbatim (a property override after construction).
* Principals are literal role ARNs (the builder validates them as strings), so the key depends
  explicitly on the constructs that create those roles: KMS refuses a policy naming a principal that
  does not exist yet.
* Rotation is on; the key is retained when the stack is deleted (sealed models would become unreadable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aws_cdk import aws_kms as kms
from constructs import Construct, IConstruct

from infra.constructs.policy_key import key_with_exact_policy
from nitrovault.policy.build import model_key_policy


class ModelKey(Construct):
    """``.key`` is the KMS key, ``.policy`` the exact policy document it was given (a plain dict)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        account_id: str,
        admin_arns: Sequence[str],
        sealer_arns: Sequence[str],
        enclave_role_arns: Sequence[str],
        pcrs: Mapping[int, bytes],
        encryption_context: Mapping[str, str],
        principals_created_by: Sequence[IConstruct] = (),
        unsafe_allow_debug_pcrs: bool = False,
        alias_name: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.policy: dict[str, Any] = model_key_policy(
            account_id=account_id,
            admin_arns=admin_arns,
            sealer_arns=sealer_arns,
            enclave_role_arns=enclave_role_arns,
            pcrs=pcrs,
            encryption_context=encryption_context,
            unsafe_allow_debug_pcrs=unsafe_allow_debug_pcrs,
        )
        # CloudFormation gets the builder's document verbatim: what the reviewer and the tests see is byte
        # for byte what KMS gets (:func:`infra.constructs.policy_key.key_with_exact_policy`)
        self.key = key_with_exact_policy(
            self,
            "Key",
            description="nitrovault model key: data keys released only to the attested enclave image",
            policy=self.policy,
            depends_on=principals_created_by,
        )
        if alias_name:
            # The alias is a separate resource: creating it needs kms:CreateAlias, which admins have.
            kms.CfnAlias(self, "Alias", alias_name=alias_name, target_key_id=self.key.key_id)
