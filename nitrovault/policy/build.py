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
3. ``ReleaseToAttestedEnclave`` (then ``ReleaseToAttestedEnclave2``, ``...3``: one statement per
   accepted measurement set): the enclave host role may ``Decrypt`` only with the model's encryption
   context and a ``Recipient`` whose attested PCRs equal one set's (``StringEqualsIgnoreCase`` on
   ``kms:RecipientAttestation:PCRn``, as AWS recommends, one value per PCR). A statement per set, never a
   list of values per PCR: a list would admit PCR0 of one image with PCR1 of another. Several sets are
   how an image rollout overlaps (the current and the next image's manifests, ``docs/deploy.md``).
4. ``DenyDecryptWithoutAttestation``: an explicit deny of ``Decrypt`` to everyone when no attestation is
   present, so no later statement or IAM policy can hand out plaintext.

A measurement set is either an **image set** (PCR0, PCR1 and PCR2, optionally PCR3, PCR4 and PCR8: one
image, ``pcr_sets=``) or a **signer set** (PCR8, the hash of the image signing certificate, optionally
PCR3, the parent's IAM role; ``signer_sets=``): every image signed with that certificate qualifies, so a
new image signed by the same owner key needs no policy change (and an old one signed by it stays
accepted until the certificate changes). A signer set never binds PCR4 (the instance id: it would only
ever match one host). With no set at all (``pcr_sets=[]``, the first deploy before any image exists) the
policy has no release statement and nothing can decrypt. Debug sets (all-zero PCR0/1/2/8) and two equal
sets are refused.

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
>>> rollout = model_key_policy(account_id="111122223333",
...     admin_arns=["arn:aws:iam::111122223333:role/admin"],
...     sealer_arns=["arn:aws:iam::111122223333:role/sealer"],
...     enclave_role_arns=["arn:aws:iam::111122223333:role/enclave"],
...     pcr_sets=[{i: bytes([0x10 + i]) * 48 for i in (0, 1, 2)},
...               {i: bytes([0x20 + i]) * 48 for i in (0, 1, 2)}],
...     encryption_context={"model": "m", "version": "1"})
>>> [s["Sid"] for s in rollout["Statement"]][2:4]
['ReleaseToAttestedEnclave', 'ReleaseToAttestedEnclave2']
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from nitrovault.errors import PolicyError

log = logging.getLogger(__name__)

#: PCRs every image set binds; PCR3 (parent role), PCR4 (instance) and PCR8 (signing cert) are added when
#: the image's manifest names them.
REQUIRED_PCRS = (0, 1, 2)
OPTIONAL_PCRS = (3, 4, 8)
#: A signer set binds PCR8 (the signing certificate) and optionally PCR3 (the parent's role), nothing else.
SIGNER_REQUIRED_PCRS = (8,)
SIGNER_OPTIONAL_PCRS = (3,)
#: Sid of the first release statement; the n-th accepted set's is this with ``n`` appended (n >= 2).
RELEASE_SID = "ReleaseToAttestedEnclave"
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
    encryption_context: Mapping[str, str],
    pcrs: Mapping[int, bytes] | None = None,
    pcr_sets: Sequence[Mapping[int, bytes]] | None = None,
    signer_sets: Sequence[Mapping[int, bytes]] = (),
    unsafe_allow_debug_pcrs: bool = False,
) -> dict[str, Any]:
    """The key policy for one model key. Raises :class:`PolicyError` on anything that would weaken it.

    ``pcrs`` is one image set (the policy of a single image); ``pcr_sets`` the image sets of a rollout, in
    order (the first gets Sid ``ReleaseToAttestedEnclave``), possibly none; give one or the other.
    ``signer_sets`` follow the image sets (module docstring). The policy for one image set is the same
    whichever way it is passed.
    """
    _check_account(account_id)
    for name, arns in (("admin", admin_arns), ("sealer", sealer_arns), ("enclave", enclave_role_arns)):
        _check_principals(account_id, name, arns)
    if (pcrs is None) == (pcr_sets is None):
        raise PolicyError("give the PCRs either as pcrs= (one image) or as pcr_sets= (a list), not both")
    if isinstance(pcr_sets, Mapping) or isinstance(signer_sets, Mapping):
        raise PolicyError("pcr_sets and signer_sets are lists of PCR sets, not one set")
    images = [pcrs] if pcrs is not None else list(pcr_sets or ())
    sets = [_image_set(i, s) for i, s in enumerate(images, 1)]
    sets += [_signer_set(i, s) for i, s in enumerate(signer_sets, len(sets) + 1)]
    for index, pcr_set in enumerate(sets):
        if pcr_set in sets[:index]:
            raise PolicyError(
                f"measurement set {index + 1} is the same as set {sets.index(pcr_set) + 1}: "
                "each accepted set must appear once (is the same manifest given twice?)"
            )
    for index, pcr_set in enumerate(sets, 1):
        _check_debug(index, pcr_set, unsafe_allow_debug_pcrs)
    if not encryption_context:
        raise PolicyError("an encryption context naming the model is required")
    if not sets:
        log.info("the model key policy has no release statement: no enclave can decrypt until a set is added")

    context_condition = {f"kms:EncryptionContext:{k}": v for k, v in sorted(encryption_context.items())}
    releases = [
        {
            "Sid": RELEASE_SID if n == 1 else f"{RELEASE_SID}{n}",
            "Effect": "Allow",
            "Principal": {"AWS": list(enclave_role_arns)},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {
                "StringEquals": context_condition,
                "StringEqualsIgnoreCase": {
                    f"kms:RecipientAttestation:PCR{i}": pcr_set[i].hex() for i in sorted(pcr_set)
                },
            },
        }
        for n, pcr_set in enumerate(sets, 1)
    ]
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
            *releases,
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


def _pcr_values(number: int, pcr_set: Mapping[int, bytes]) -> dict[int, bytes]:
    if not isinstance(pcr_set, Mapping):
        raise PolicyError(f"measurement set {number} must map PCR indexes to 48-byte values")
    for index, value in pcr_set.items():
        if not isinstance(value, bytes) or len(value) != 48:
            size = len(value) if isinstance(value, bytes) else type(value).__name__
            raise PolicyError(f"PCR{index} must be 48 bytes, got {size} (measurement set {number})")
    return dict(sorted(pcr_set.items()))


def _image_set(number: int, pcr_set: Mapping[int, bytes]) -> dict[int, bytes]:
    """One image's PCRs: 0, 1 and 2, optionally 3, 4 and 8."""
    pcr_set = _pcr_values(number, pcr_set)
    missing = [i for i in REQUIRED_PCRS if i not in pcr_set]
    if missing:
        raise PolicyError(
            f"the release statement must bind PCR0, PCR1 and PCR2 (missing {missing}, measurement set "
            f"{number}); bind the signing certificate alone with signer_sets="
        )
    unknown = sorted(set(pcr_set) - set(REQUIRED_PCRS) - set(OPTIONAL_PCRS))
    if unknown:
        raise PolicyError(f"unexpected PCR indexes {unknown} (measurement set {number})")
    return pcr_set


def _signer_set(number: int, pcr_set: Mapping[int, bytes]) -> dict[int, bytes]:
    """The signing certificate's PCR8, optionally the parent role's PCR3; no image's, no instance's."""
    pcr_set = _pcr_values(number, pcr_set)
    if 8 not in pcr_set:
        raise PolicyError(
            f"a signer set binds PCR8, the image signing certificate (measurement set {number})"
        )
    unknown = sorted(set(pcr_set) - set(SIGNER_REQUIRED_PCRS) - set(SIGNER_OPTIONAL_PCRS))
    if unknown:
        raise PolicyError(
            f"a signer set binds only PCR8 and optionally PCR3, not {unknown} (measurement set {number}): "
            "PCR0/1/2 make it an image set, PCR4 (the instance id) would match only one host"
        )
    return pcr_set


def _check_debug(number: int, pcr_set: Mapping[int, bytes], unsafe_allow_debug_pcrs: bool) -> None:
    zeros = [i for i in DEBUG_ZERO_PCRS if i in pcr_set and not any(pcr_set[i])]
    if not zeros:
        return
    if not unsafe_allow_debug_pcrs:
        names = ", ".join(f"PCR{i}" for i in zeros)
        raise PolicyError(
            f"all-zero PCRs are a debug-mode enclave: anyone can run one with any code ({names} of "
            f"measurement set {number}). Refusing to bind a production key to them."
        )
    log.warning("UNSAFE: binding a key policy to all-zero (debug-mode) PCRs; never do this in production")


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
