"""The model key: a KMS key whose whole policy comes from :func:`nitrovault.policy.build.model_key_policy`.

Invariants:

* The key policy is exactly the builder's output: administrators manage but never use the key, the
  sealer may only ``GenerateDataKey`` with the model's encryption context, the enclave host role may only
  ``Decrypt`` with ``kms:RecipientAttestation:PCRn`` conditions equal to one accepted measurement set
  (one statement per set: ``pcrs=`` for one image, ``pcr_sets=`` for a rollout or none, ``signer_sets=``),
  and an explicit deny refuses ``Decrypt`` without attestation. No statement names the account root: CDK's
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
from nitrovault.policy.build import RELEASE_SID, model_key_policy


class ModelKey(Construct):
    """``.key`` is the KMS key, ``.policy`` the exact policy document it was given (a plain dict),
    ``.release_sets`` the number of measurement sets that policy releases the key to."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        account_id: str,
        admin_arns: Sequence[str],
        sealer_arns: Sequence[str],
        enclave_role_arns: Sequence[str],
        encryption_context: Mapping[str, str],
        pcrs: Mapping[int, bytes] | None = None,
        pcr_sets: Sequence[Mapping[int, bytes]] | None = None,
        signer_sets: Sequence[Mapping[int, bytes]] = (),
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
            pcr_sets=pcr_sets,
            signer_sets=signer_sets,
            encryption_context=encryption_context,
            unsafe_allow_debug_pcrs=unsafe_allow_debug_pcrs,
        )
        #: how many measurement sets the key is released to (one Allow Decrypt statement each)
        self.release_sets = sum(1 for st in self.policy["Statement"] if st["Sid"].startswith(RELEASE_SID))
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
