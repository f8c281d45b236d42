"""The builders of every nitrovault key policy (pure): the CDK app, ``nitrovault local up`` and the
reviewer's tests all take their key policies from here, so what is reviewed is what is deployed.

Four keys, four builders, one style: key administrators manage but never use a key (their
``PutKeyPolicy`` is the documented, CloudTrail-logged break-glass path, never a silent decrypt), and no
statement names the account root, so no IAM policy in the account can delegate use of any key.

:func:`model_key_policy` (the model key: released only to the attested enclave) has exactly these
statements:

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

The three *at-rest* keys protect data that AWS services encrypt for us; no caller ever receives their key
material, so they need no attestation, and each is usable only through its service:

* :func:`store_key_policy` (SSE-KMS of the weights bucket): ``KeyAdministration``; ``WriteThroughS3``
  (the writers -- the sealer -- ``GenerateDataKey`` and ``Decrypt``, the latter because S3 decrypts the
  data key to finish a multipart upload); ``ReadThroughS3`` (the readers -- the enclave host role --
  ``Decrypt``); both only with ``kms:ViaService`` = ``s3.<region>.amazonaws.com``, ``kms:CallerAccount``
  = the account and the bucket's S3 encryption context (``kms:EncryptionContext:aws:s3:arn`` = the bucket
  ARN, which S3 uses with Bucket Keys, or an object ARN in it); and ``DenyUseOutsideS3`` (everyone:
  no cryptographic call on the key unless S3 makes it). What this key protects is the sealed file, already
  AEAD-encrypted under the model's data key: the store key guards it at rest, not its secrecy.
* :func:`logs_key_policy` (the log groups): ``KeyAdministration``; ``CloudWatchLogsUse`` (only the
  region's CloudWatch Logs service principal, only with ``kms:EncryptionContext:aws:logs:arn`` ArnLike
  the account's ``/nitrovault/*`` log groups, as "Encrypt log data in CloudWatch Logs using AWS KMS"
  documents); ``DenyDecryptWithoutLogsContext`` (everyone: no ``Decrypt`` without a log-group context).
* :func:`alarm_topic_key_policy` (the SNS alarm topic): ``KeyAdministration``; ``CloudWatchAlarmsPublish``
  (the CloudWatch service principal may ``Decrypt`` and ``GenerateDataKey*``: what SNS needs to accept an
  alarm's message on an encrypted topic).

>>> store = store_key_policy(account_id="111122223333", region="eu-west-1",
...     admin_arns=["arn:aws:iam::111122223333:role/admin"],
...     writer_arns=["arn:aws:iam::111122223333:role/sealer"],
...     reader_arns=["arn:aws:iam::111122223333:role/enclave"], bucket_name="weights-bucket")
>>> [s["Sid"] for s in store["Statement"]]
['KeyAdministration', 'WriteThroughS3', 'ReadThroughS3', 'DenyUseOutsideS3']
>>> logs_key_policy(account_id="111122223333", region="eu-west-1",
...     admin_arns=["arn:aws:iam::111122223333:role/admin"])["Statement"][1]["Principal"]
{'Service': 'logs.eu-west-1.amazonaws.com'}

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
import re
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

#: What the weights store's writers may ask KMS for through S3: a data key for a new object (S3 calls
#: ``GenerateDataKey``, once per Bucket Key with Bucket Keys on) and ``Decrypt``, which S3 calls to finish
#: a multipart upload (every upload above the CLI's 8 MiB threshold) and to read an object back.
STORE_WRITE_ACTIONS = ("kms:GenerateDataKey", "kms:Decrypt")
#: What the weights store's readers may ask KMS for through S3.
STORE_READ_ACTIONS = ("kms:Decrypt",)
#: Cryptographic actions refused on the store key to everyone unless S3 makes the call.
STORE_DENIED_OUTSIDE_S3 = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*", "kms:ReEncrypt*")
#: The CloudWatch Logs service's actions, as "Encrypt log data in CloudWatch Logs using AWS KMS" lists them.
LOGS_SERVICE_ACTIONS = (
    "kms:Encrypt*",
    "kms:Decrypt*",
    "kms:ReEncrypt*",
    "kms:GenerateDataKey*",
    "kms:Describe*",
)
#: What CloudWatch alarms need on the key of an encrypted SNS topic they publish to.
ALARM_PUBLISH_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey*")
#: The log groups the logs key serves: the account's ``/nitrovault/*`` groups (the Observability
#: construct refuses any other name).
LOG_GROUP_PREFIX = "/nitrovault/"

_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
#: S3 general-purpose bucket names: 3-63 lower-case letters, digits, dots and hyphens.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    _check_account(account_id)
    for name, arns in (("admin", admin_arns), ("sealer", sealer_arns), ("enclave", enclave_role_arns)):
        _check_principals(account_id, name, arns)
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
            _administration(admin_arns),
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


def store_key_policy(
    *,
    account_id: str,
    region: str,
    admin_arns: Sequence[str],
    writer_arns: Sequence[str],
    reader_arns: Sequence[str],
    bucket_name: str,
) -> dict[str, Any]:
    """The weights store's SSE-KMS key policy (see the module docstring). :class:`PolicyError` on a bad
    account, region, bucket name or principal."""
    _check_account(account_id)
    _check_region(region)
    if not _BUCKET.fullmatch(bucket_name) or ".." in bucket_name:
        raise PolicyError(f"not an S3 bucket name: {bucket_name!r}")
    for name, arns in (("admin", admin_arns), ("writer", writer_arns), ("reader", reader_arns)):
        _check_principals(account_id, name, arns)
    bucket_arn = f"arn:aws:s3:::{bucket_name}"
    via_s3 = f"s3.{region}.amazonaws.com"
    # With Bucket Keys (on for the weights bucket) S3 uses the bucket ARN as the encryption context;
    # an object written with Bucket Keys off uses its object ARN: both stay inside this one bucket.
    through_s3 = {
        "StringEquals": {"kms:ViaService": via_s3, "kms:CallerAccount": account_id},
        "ArnLike": {"kms:EncryptionContext:aws:s3:arn": [bucket_arn, f"{bucket_arn}/*"]},
    }
    return {
        "Version": "2012-10-17",
        "Id": "nitrovault-store-key",
        "Statement": [
            _administration(admin_arns),
            {
                "Sid": "WriteThroughS3",
                "Effect": "Allow",
                "Principal": {"AWS": list(writer_arns)},
                "Action": list(STORE_WRITE_ACTIONS),
                "Resource": "*",
                "Condition": through_s3,
            },
            {
                "Sid": "ReadThroughS3",
                "Effect": "Allow",
                "Principal": {"AWS": list(reader_arns)},
                "Action": list(STORE_READ_ACTIONS),
                "Resource": "*",
                "Condition": through_s3,
            },
            {
                "Sid": "DenyUseOutsideS3",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": list(STORE_DENIED_OUTSIDE_S3),
                "Resource": "*",
                "Condition": {"StringNotEquals": {"kms:ViaService": via_s3}},
            },
        ],
    }


def logs_key_policy(*, account_id: str, region: str, admin_arns: Sequence[str]) -> dict[str, Any]:
    """The log groups' key policy (see the module docstring). :class:`PolicyError` on bad input."""
    _check_account(account_id)
    _check_region(region)
    _check_principals(account_id, "admin", admin_arns)
    groups = f"arn:aws:logs:{region}:{account_id}:log-group:{LOG_GROUP_PREFIX}*"
    return {
        "Version": "2012-10-17",
        "Id": "nitrovault-logs-key",
        "Statement": [
            _administration(admin_arns),
            {
                "Sid": "CloudWatchLogsUse",
                "Effect": "Allow",
                "Principal": {"Service": f"logs.{region}.amazonaws.com"},
                "Action": list(LOGS_SERVICE_ACTIONS),
                "Resource": "*",
                "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn": groups}},
            },
            {
                "Sid": "DenyDecryptWithoutLogsContext",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"Null": {"kms:EncryptionContext:aws:logs:arn": "true"}},
            },
        ],
    }


def alarm_topic_key_policy(*, account_id: str, admin_arns: Sequence[str]) -> dict[str, Any]:
    """The SNS alarm topic's key policy (see the module docstring). :class:`PolicyError` on bad input.

    The CloudWatch statement has no condition: the CloudWatch User Guide's statement for alarms that
    publish to an encrypted topic has none, and a condition key absent from CloudWatch's request would
    silently drop every alarm notification. The topic carries alarm names and states, never key material.
    """
    _check_account(account_id)
    _check_principals(account_id, "admin", admin_arns)
    return {
        "Version": "2012-10-17",
        "Id": "nitrovault-alarm-topic-key",
        "Statement": [
            _administration(admin_arns),
            {
                "Sid": "CloudWatchAlarmsPublish",
                "Effect": "Allow",
                "Principal": {"Service": "cloudwatch.amazonaws.com"},
                "Action": list(ALARM_PUBLISH_ACTIONS),
                "Resource": "*",
            },
        ],
    }


def _administration(admin_arns: Sequence[str]) -> dict[str, Any]:
    """Manage, never use: the one statement key administrators get in every policy."""
    return {
        "Sid": "KeyAdministration",
        "Effect": "Allow",
        "Principal": {"AWS": list(admin_arns)},
        "Action": list(ADMIN_ACTIONS),
        "Resource": "*",
    }


def _check_account(account_id: str) -> None:
    if not (account_id.isdigit() and len(account_id) == 12):
        raise PolicyError("account_id must be 12 digits")


def _check_region(region: str) -> None:
    if not _REGION.fullmatch(region):
        raise PolicyError(f"not an AWS region name: {region!r}")


def _check_principals(account_id: str, name: str, arns: Sequence[str]) -> None:
    """At least one principal, each an IAM role or user ARN of the account (never the root)."""
    if isinstance(arns, str):
        raise PolicyError(f"{name} principals must be a list of ARNs, not one string")
    if not arns:
        raise PolicyError(f"at least one {name} principal is required")
    for arn in arns:
        if not arn.startswith(f"arn:aws:iam::{account_id}:") or arn.endswith(":root") or "*" in arn:
            raise PolicyError(f"{name} principal must be an IAM role or user of the account, not {arn!r}")
