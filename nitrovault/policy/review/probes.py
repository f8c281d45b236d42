"""Proof with the evaluator: the requests KMS would build for the reviewer's claims, evaluated by
:func:`~nitrovault.policy.evaluate_key_policy` (the KMS emulator's evaluator). Pure.

A claim is checked (a) without an attestation document, (b) with *foreign* PCRs (:data:`PROBE_PCRS`,
values no real image has), (c) with the manifest's PCRs; each principal label is probed as one caller ARN
it covers (:func:`probe_arn`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from nitrovault.policy.evaluate import Decision, Policy, build_request_context, evaluate_key_policy
from nitrovault.policy.review.reading import root_arn

__all__ = ["OUTSIDER_ACCOUNT", "PROBE_PCRS", "Prober", "anyone_arn", "default_key_arn", "probe_arn"]

#: Foreign measurements for the "any enclave" proof: derived from a fixed label so the review is
#: deterministic, and (being SHA-384 outputs of a label no build hashes) equal to no real image's PCRs.
PROBE_PCRS: Mapping[int, bytes] = {
    i: hashlib.sha384(f"nitrovault-review-foreign-pcr{i}".encode()).digest() for i in (0, 1, 2, 3, 4, 8)
}
#: An account no policy names: the caller for ``"*"``, and the key's account when none is known.
OUTSIDER_ACCOUNT = "999988887777"


def anyone_arn() -> str:
    """A caller in no account the policy names (what ``"*"`` covers and nothing else does)."""
    return f"arn:aws:iam::{OUTSIDER_ACCOUNT}:role/nitrovault-review-anyone"


def default_key_arn(key: str, region: str | None = None, account: str | None = None) -> str:
    """The key ARN the requests name when the caller gives none."""
    return f"arn:aws:kms:{region or 'us-east-1'}:{account or OUTSIDER_ACCOUNT}:key/{key}"


def probe_arn(label: str) -> str | None:
    """A caller ARN that the principal ``label`` covers, for the evaluator (None: not probeable)."""
    if label == "*":
        return anyone_arn()
    root = root_arn(label)
    if root:  # any IAM identity of the account, via delegation
        return f"arn:{root.group(1)}:iam::{root.group(2)}:role/nitrovault-review-iam-delegate"
    if label.startswith("arn:"):
        return label
    return None


@dataclass(frozen=True)
class Prober:
    """Evaluates requests against one parsed key policy, for the key ``key_arn``."""

    policy: Policy
    key_arn: str

    def decide(
        self, action: str, who: str, context: Mapping[str, str], pcrs: Mapping[int, bytes] | None
    ) -> Decision:
        request = build_request_context(action, who, self.key_arn, context, pcrs)
        return evaluate_key_policy(self.policy, request)

    def allowed(
        self, action: str, who: str, context: Mapping[str, str], pcrs: Mapping[int, bytes] | None
    ) -> bool:
        return self.decide(action, who, context, pcrs).allowed
