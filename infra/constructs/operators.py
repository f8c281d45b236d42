"""The human-facing roles named in the model key policy: key administrators and the sealer.

Invariants:

* Both roles have explicit names, so their literal ARNs go into the key policy (:attr:`admin_arn`,
  :attr:`sealer_arn`) and the key can depend on this construct.
* The roles are assumable by principals of this account that IAM allows to (trust: the account);
  what they can do with the *model key* is decided only by its key policy: administrators manage it,
  the sealer calls ``GenerateDataKey`` with the model's encryption context.
* The sealer may upload sealed models to the weights store (the grant is made by the store).
"""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from constructs import Construct


class OperatorRoles(Construct):
    """``.admin_role``, ``.sealer_role`` and their literal ARNs."""

    def __init__(self, scope: Construct, construct_id: str, *, name_prefix: str) -> None:
        super().__init__(scope, construct_id)
        account = Stack.of(self).account
        admin_name = f"{name_prefix}-key-admin"
        sealer_name = f"{name_prefix}-sealer"
        self.admin_arn = f"arn:aws:iam::{account}:role/{admin_name}"
        self.sealer_arn = f"arn:aws:iam::{account}:role/{sealer_name}"
        self.admin_role = iam.Role(
            self,
            "KeyAdmin",
            role_name=admin_name,
            assumed_by=iam.AccountPrincipal(account),
            description="nitrovault: manages the model key (never uses it); break-glass is PutKeyPolicy",
        )
        self.sealer_role = iam.Role(
            self,
            "Sealer",
            role_name=sealer_name,
            assumed_by=iam.AccountPrincipal(account),
            description="nitrovault: seals models (GenerateDataKey with the model's encryption context)",
        )
