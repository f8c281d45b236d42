"""A KMS key whose ``KeyPolicy`` is exactly a document from :mod:`nitrovault.policy.build`.

Used for every key the app creates: the model key (:class:`infra.constructs.model_key.ModelKey`) and the
at-rest keys (the weights store's, the log groups', the alarm topic's).

Invariants:

* The synthesized ``KeyPolicy`` is the builder's dict verbatim (a property override after construction):
  CDK's default policy (the account root with ``kms:*``, which lets IAM delegate use of the key) is
  never written, and a statement CDK might add later (a ``grant*`` call) is overwritten, not slipped in.
  Grant access by changing the builder, never with ``key.grant*``.
* Rotation is on and the key is retained when the stack is deleted (what it encrypted stays readable).
* The key depends on every construct in ``depends_on``: KMS refuses a policy naming a principal that does
  not exist yet, so pass the ``CfnRole`` of every role the policy names (the ``CfnRole``, not the
  ``iam.Role``: a role's default policy may reference what this key encrypts, which would be a cycle).

Example::

    key = key_with_exact_policy(self, "LogsKey", description="...",
                                policy=logs_key_policy(account_id=..., region=..., admin_arns=[...]),
                                depends_on=[admin_role.node.default_child])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aws_cdk import RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct, IConstruct


def key_with_exact_policy(
    scope: Construct,
    construct_id: str,
    *,
    description: str,
    policy: Mapping[str, Any],
    depends_on: Sequence[IConstruct] = (),
) -> kms.Key:
    """A rotated, retained ``kms.Key`` whose CloudFormation ``KeyPolicy`` is ``policy`` exactly."""
    key = kms.Key(
        scope,
        construct_id,
        description=description,
        enable_key_rotation=True,
        policy=iam.PolicyDocument.from_json(dict(policy)),
        removal_policy=RemovalPolicy.RETAIN,
    )
    cfn_key = key.node.default_child
    if not isinstance(cfn_key, kms.CfnKey):
        raise TypeError("kms.Key has no CfnKey child: the CDK version changed its structure")
    cfn_key.add_property_override("KeyPolicy", dict(policy))
    for construct in depends_on:
        key.node.add_dependency(construct)
    return key
