"""The one builder of model-key policies (pure): the CDK app, ``nitrovault local up`` and the reviewer's
tests all take their key policy from here, so what is reviewed is what is deployed.

The policy it writes has exactly these statements:

1. ``KeyAdministration``: administrators manage the key (describe, enable/disable, rotate, tag, schedule
   deletion, put the policy) but get no cryptographic action. Being able to put the policy is the
   documented break-glass path: it is a visible, CloudTrail-logged change, not a silent decrypt.
2. ``SealModel``: the sealing role may ``GenerateDataKey`` only with the model's encryption context.
3. ``ReleaseToAttestedEnclave``: the enclave host role may ``Decrypt`` only with the model's encryption
   context and a ``Recipient`` whose attested PCRs equal the reviewed image's (``StringEqualsIgnoreCase``
   on ``kms:RecipientAttestation:PCRn``, as AWS recommends).
4. ``DenyDecryptWithoutAttestation``: an explicit deny of ``Decrypt`` to everyone when no attestation is
   present, so no later statement or IAM policy can hand out plaintext.

No statement names the account root: the default CDK/KMS key policy (``arn:aws:iam::ACCOUNT:root`` with
``kms:*``) would let any IAM policy in the account grant plaintext access, which is what we avoid.

>>> policy = model_key_policy(account_id="111122223333",
...     admin_arns=["arn:aws:iam::111122223333:role/admin"],
...     sealer_arns=["arn:aws:iam::111122223333:role/sealer"],
...     enclave_role_arns=["arn:aws:iam::111122223333:role/enclave"],
...     pcrs={0: bytes(range(48)), 1: bytes(48 * [1]), 2: bytes(48 * [2])},
...     encryption_context={"model": "m", "version": "1"})
>>> [s["Sid"] for s in policy["Statement"]]
['KeyAdministration', 'SealModel', 'ReleaseToAttestedEnclave', 'DenyDecryptWithoutAttestation']
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from nitrovault.errors import PolicyError

log = logging.getLogger(__name__)

#: PCRs every release statement binds; PCR3 (parent role), PCR4 (instance) and PCR8 (signing cert) are
#: added when the image's manifest names them.
REQUIRED_PCRS = (0, 1, 2)
OPTIONAL_PCRS = (3, 4, 8)
#: PCRs that are all zeros in a debug-mode enclave (PCR3/PCR4 stay set in debug mode).
DEBUG_ZERO_PCRS = (0, 1, 2, 8)

ADMIN_ACTIONS = (
    "kms:CancelKeyDeletion",
    "kms:CreateAlias",
    "kms:DeleteAlias",
    "kms:DescribeKey",
    "kms:DisableKey",
    "kms:DisableKeyRotation",
    "kms:EnableKey",
    "kms:EnableKeyRotation",
    "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:ListAliases",
    "kms:ListResourceTags",
    "kms:PutKeyPolicy",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateAlias",
    "kms:UpdateKeyDescription",
)


def model_key_policy(
    *,
    account_id: str,
    admin_arns: Sequence[str],
    sealer_arns: Sequence[str],
    enclave_role_arns: Sequence[str],
    pcrs: Mapping[int, bytes],
    encryption_context: Mapping[str, str],
    unsafe_allow_debug_pcrs: bool = False,
) -> dict[str, Any]:
    """The key policy for one model key. Raises :class:`PolicyError` on anything that would weaken it."""
    if not (account_id.isdigit() and len(account_id) == 12):
        raise PolicyError("account_id must be 12 digits")
    for name, arns in (("admin", admin_arns), ("sealer", sealer_arns), ("enclave", enclave_role_arns)):
        if not arns:
            raise PolicyError(f"at least one {name} principal is required")
        for arn in arns:
            if not arn.startswith(f"arn:aws:iam::{account_id}:") or arn.endswith(":root"):
                raise PolicyError(f"{name} principal must be an IAM role or user of the account, not {arn!r}")
    missing = [i for i in REQUIRED_PCRS if i not in pcrs]
    if missing:
        raise PolicyError(f"the release statement must bind PCR0, PCR1 and PCR2 (missing {missing})")
    unknown = sorted(set(pcrs) - set(REQUIRED_PCRS) - set(OPTIONAL_PCRS))
    if unknown:
        raise PolicyError(f"unexpected PCR indexes {unknown}")
    for index, value in pcrs.items():
        if len(value) != 48:
            raise PolicyError(f"PCR{index} must be 48 bytes, got {len(value)}")
    if any(not any(pcrs[i]) for i in DEBUG_ZERO_PCRS if i in pcrs):
        if not unsafe_allow_debug_pcrs:
            raise PolicyError(
                "all-zero PCRs are a debug-mode enclave: anyone can run one with any code. "
                "Refusing to bind a production key to them."
            )
        log.warning("UNSAFE: binding a key policy to all-zero (debug-mode) PCRs; never do this in production")
    if not encryption_context:
        raise PolicyError("an encryption context naming the model is required")

    context_condition = {f"kms:EncryptionContext:{k}": v for k, v in sorted(encryption_context.items())}
    pcr_condition = {f"kms:RecipientAttestation:PCR{i}": pcrs[i].hex() for i in sorted(pcrs)}
    return {
        "Version": "2012-10-17",
        "Id": "nitrovault-model-key",
        "Statement": [
            {
                "Sid": "KeyAdministration",
                "Effect": "Allow",
                "Principal": {"AWS": list(admin_arns)},
                "Action": list(ADMIN_ACTIONS),
                "Resource": "*",
            },
            {
                "Sid": "SealModel",
                "Effect": "Allow",
                "Principal": {"AWS": list(sealer_arns)},
                "Action": "kms:GenerateDataKey",
                "Resource": "*",
                "Condition": {"StringEquals": context_condition},
            },
            {
                "Sid": "ReleaseToAttestedEnclave",
                "Effect": "Allow",
                "Principal": {"AWS": list(enclave_role_arns)},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEquals": context_condition, "StringEqualsIgnoreCase": pcr_condition},
            },
            {
                "Sid": "DenyDecryptWithoutAttestation",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"Null": {"kms:RecipientAttestation:PCR0": "true"}},
            },
        ],
    }
