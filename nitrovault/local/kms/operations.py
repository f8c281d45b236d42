"""The KMS operations the emulator serves, over a :class:`~nitrovault.local.kms.store.Store`.

Input and output are the decoded JSON bodies of the KMS JSON 1.1 protocol (member names as in the
botocore model ``kms/2014-11-01``; blobs base64, timestamps epoch seconds). Every refusal raises a
:class:`~nitrovault.errors.KeyReleaseError` whose ``code`` is the real KMS error code; the HTTP shell
turns it into ``{"__type": code, "message": ...}`` with status 400.

Authorisation (documented in ``docs/kms-emulator.md``):

* Key-scoped calls evaluate the key's policy with :func:`nitrovault.policy.evaluate_key_policy` for the
  action ``kms:<Operation>`` (``kms:ReEncryptFrom`` / ``kms:ReEncryptTo`` for ReEncrypt), the SigV4
  caller's principal ARN, the key ARN, the encryption context and, with ``Recipient``, the attested
  PCRs. There are no IAM policies: the key policy alone decides.
* CreateKey, ListKeys, ListAliases and GenerateRandom (without a key) are account-level: any known
  principal may call them.
* CreateKey without ``Policy`` gets the AWS default key policy (the caller's account root, ``kms:*``).

Where a key is found (as in AWS, "Find the key ID and key ARN" / "Using aliases"): the request's region is
its SigV4 credential scope's region, and keys and aliases live in one account and one region.

* A bare key id or ``alias/name`` names a key or alias of the caller's account in the request's region
  only; anything else is ``NotFoundException`` whose message names the ARN the reference would have
  had in the caller's account (so it reveals nothing about other accounts' keys).
* Another account's key is reached by its key ARN (or alias ARN) only, in the same region; the key
  policy then decides. A key or alias ARN of another region is ``NotFoundException``.
* ListKeys and ListAliases list the caller's account in the request's region.
* A ciphertext blob whose key is not in the request's region is ``InvalidCiphertextException``.

``DryRun`` (Decrypt, Encrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, ReEncrypt: the
operations the emulator implements of those that take it in AWS): every check runs, the key policy,
the key state, the ciphertext and the ``Recipient`` document included, and then, instead of the answer,
``DryRunOperationException`` ("The request would have succeeded, but the DryRun option is set."). A
request that would fail answers that failure. Nothing is created, released or written.

``Recipient``: the attestation document is verified with :func:`nitrovault.attestation.verify_document`
against the configured root at the emulator's clock, with ``max_age``; any failure is an
``AccessDeniedException`` naming the failed step (like real KMS, "without a valid attestation document
permission is denied"). The answer then carries ``CiphertextForRecipient`` and no ``Plaintext``. Every
recipient decision is written to the audit sink (principal, operation, key, allowed, module id, PCR0
prefix; never key material).

Invariants: plaintext, key material and secrets never appear in an error message or an audit record;
time and randomness are parameters.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, overload

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nitrovault.errors import (
    AttestationError,
    InvalidCiphertextError,
    KeyAccessDeniedError,
    KeyNotFoundError,
    KeyReleaseError,
    KeyUnavailableError,
    PolicyError,
)
from nitrovault.kms.endpoints import partition
from nitrovault.local.kms import blob
from nitrovault.local.kms.sigv4 import Caller
from nitrovault.local.kms.store import AliasRecord, KeyRecord, Store, replace

log = logging.getLogger(__name__)

Json = dict[str, Any]
AuditSink = Callable[[Mapping[str, Any]], None]
SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
_ALIAS_RE = re.compile(r"^alias/[a-zA-Z0-9/_-]{1,250}$")
_DAY = 86400.0


def stderr_audit(record: Mapping[str, Any]) -> None:
    """The default audit sink: one JSON line on stderr."""
    sys.stderr.write(json.dumps(dict(record), sort_keys=True) + "\n")
    sys.stderr.flush()


def default_key_policy(account: str) -> str:
    """The policy AWS gives a key created without one: the account root may do ``kms:*``."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


def _fault(code: str, message: str) -> KeyReleaseError:
    return KeyReleaseError(message, code=code)


def _validation(message: str) -> KeyReleaseError:
    return _fault("ValidationException", message)


def _invalid_state(message: str) -> KeyUnavailableError:
    return KeyUnavailableError(message, code="KMSInvalidStateException")


DRY_RUN_CODE = "DryRunOperationException"
DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."


def _dry_run(body: Mapping[str, Any]) -> bool:
    """The request's ``DryRun`` flag (absent: False)."""
    value = body.get("DryRun", False)
    if not isinstance(value, bool):
        raise _fault("SerializationException", "'DryRun' must be a boolean")
    return value


def _finish_dry_run(dry_run: bool) -> None:
    """The last step of a DryRun-capable operation: every check passed, so say so instead of acting."""
    if dry_run:
        raise _fault(DRY_RUN_CODE, DRY_RUN_MESSAGE)


# -- request decoding ----------------------------------------------------------------------------------


@overload
def _str(body: Mapping[str, Any], name: str, *, required: Literal[True]) -> str: ...
@overload
def _str(body: Mapping[str, Any], name: str, *, required: Literal[False] = False) -> str | None: ...
def _str(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _validation(f"1 validation error detected: Value null at '{_lc(name)}' failed to satisfy "
                              "constraint: Member must not be null")
        return None
    if not isinstance(value, str) or not value:
        raise _validation(f"Value at '{_lc(name)}' must be a non-empty string")
    return value


def _lc(name: str) -> str:
    return name[:1].lower() + name[1:]


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _validation(f"1 validation error detected: Value '{value}' at '{_lc(name)}' failed to satisfy "
                          f"constraint: Member must have value between {lo} and {hi}")
    return value


@overload
def _blob(body: Mapping[str, Any], name: str, *, max_len: int, required: Literal[True] = True) -> bytes: ...
@overload
def _blob(body: Mapping[str, Any], name: str, *, max_len: int, required: Literal[False]) -> bytes | None: ...
def _blob(body: Mapping[str, Any], name: str, *, max_len: int, required: bool = True) -> bytes | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _validation(f"1 validation error detected: Value null at '{_lc(name)}' failed to satisfy "
                              "constraint: Member must not be null")
        return None
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except (binascii.Error, ValueError):
        data = None
    if data is None:
        raise _fault("SerializationException", f"'{name}' is not valid base64")
    if not 1 <= len(data) <= max_len:
        raise _validation(f"1 validation error detected: Value at '{_lc(name)}' failed to satisfy "
                          f"constraint: Member must have length between 1 and {max_len}")
    return data


def _context(body: Mapping[str, Any], name: str = "EncryptionContext") -> dict[str, str]:
    value = body.get(name) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise _validation(f"'{name}' must be a map of strings to strings")
    return value


def _algorithm(body: Mapping[str, Any], name: str = "EncryptionAlgorithm") -> str:
    value = body.get(name) or SYMMETRIC_DEFAULT
    if value != SYMMETRIC_DEFAULT:
        raise _fault("InvalidKeyUsageException",
                     f"The emulator's keys only support {SYMMETRIC_DEFAULT}, not {value}.")
    return SYMMETRIC_DEFAULT


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class AttestedRecipient:
    """What a verified ``Recipient`` contributes: where to send the key, and the measurements."""

    public_key_der: bytes
    pcrs: Mapping[int, bytes]
    module_id: str


class Operations:
    """Dispatches ``TrentService.<Op>`` bodies; one instance per emulator, safe across threads."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime],
        root: x509.Certificate | None,
        max_document_age: timedelta = timedelta(minutes=5),
        unsafe_allow_debug_attestation: bool = False,
        random: Callable[[int], bytes] = os.urandom,
        audit: AuditSink = stderr_audit,
    ) -> None:
        self.store = store
        self.clock = clock
        self.root = root
        self.max_document_age = max_document_age
        self.unsafe_allow_debug_attestation = unsafe_allow_debug_attestation
        self.random = random
        self.audit = audit
        self._handlers: dict[str, Callable[[Caller, Json], Json]] = {
            "CreateKey": self.create_key,
            "DescribeKey": self.describe_key,
            "ListKeys": self.list_keys,
            "CreateAlias": self.create_alias,
            "ListAliases": self.list_aliases,
            "PutKeyPolicy": self.put_key_policy,
            "GetKeyPolicy": self.get_key_policy,
            "Encrypt": self.encrypt,
            "Decrypt": self.decrypt,
            "ReEncrypt": self.re_encrypt,
            "GenerateDataKey": self.generate_data_key,
            "GenerateDataKeyWithoutPlaintext": self.generate_data_key_without_plaintext,
            "GenerateRandom": self.generate_random,
            "EnableKey": self.enable_key,
            "DisableKey": self.disable_key,
            "EnableKeyRotation": self.enable_key_rotation,
            "DisableKeyRotation": self.disable_key_rotation,
            "GetKeyRotationStatus": self.get_key_rotation_status,
            "RotateKeyOnDemand": self.rotate_key_on_demand,
            "ScheduleKeyDeletion": self.schedule_key_deletion,
            "CancelKeyDeletion": self.cancel_key_deletion,
        }

    @property
    def operations(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def handle(self, operation: str, caller: Caller, body: Json) -> Json:
        handler = self._handlers.get(operation)
        if handler is None:
            raise _fault("UnknownOperationException", f"The emulator does not implement {operation}.")
        with self.store.lock:
            return handler(caller, body)

    # -- time, keys, policy --------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock().timestamp()

    @staticmethod
    def _arn_prefix(caller: Caller) -> str:
        """Where the caller's own keys and aliases are: its account in the request's region."""
        return f"arn:{partition(caller.region)}:kms:{caller.region}:{caller.account}"

    def _refresh(self, record: KeyRecord) -> KeyRecord | None:
        """Apply what time did: finish a scheduled deletion, perform a due automatic rotation."""
        now = self._now()
        if record.key_state == "PendingDeletion" and record.deletion_date is not None \
                and now >= record.deletion_date:
            self.store.delete(record.key_id)
            return None
        if record.rotation_enabled and record.next_rotation_date is not None \
                and now >= record.next_rotation_date and record.key_state == "Enabled":
            record = replace(record, materials=(*record.materials, self.random(32)),
                             next_rotation_date=now + record.rotation_period_days * _DAY)
            self.store.put(record)
        return record

    def _key_in(self, key_id: str, account: str, region: str, shown: str) -> KeyRecord:
        """The key ``key_id`` if it lives in ``account`` and ``region``, else NotFound naming ``shown``."""
        record = self.store.get(key_id)
        if record is not None and (record.account, record.region) == (account, region):
            record = self._refresh(record)
        else:
            record = None
        if record is None:
            raise KeyNotFoundError(f"Key '{shown}' does not exist")
        return record

    def _resolve(self, caller: Caller, key_ref: str, *, allow_alias: bool = True) -> KeyRecord:
        """Key id, key ARN, alias name or alias ARN -> key (NotFoundException when absent).

        A bare id or alias name only names the caller's account in the request's region; an ARN names
        its account, and its region must be the request's.
        """
        if key_ref.startswith("arn:"):
            parts = key_ref.split(":", 5)
            if len(parts) != 6 or parts[2] != "kms" or not parts[4].isdigit():
                raise _fault("InvalidArnException", f"{key_ref} is not a valid KMS ARN.")
            _, _, _, region, account, resource = parts
            if resource.startswith("key/"):
                if region != caller.region:
                    raise KeyNotFoundError(f"Key '{key_ref}' does not exist")
                try:
                    canonical = str(uuid.UUID(resource[4:]))
                except ValueError:
                    raise KeyNotFoundError(f"Invalid keyId '{key_ref}'") from None
                record = self._key_in(canonical, account, region, key_ref)
                if record.arn != key_ref:
                    raise KeyNotFoundError(f"Key '{key_ref}' does not exist")
                return record
            if resource.startswith("alias/") and allow_alias:
                if region != caller.region:
                    raise KeyNotFoundError(f"Alias {key_ref} is not found.")
                return self._by_alias(account, region, resource, key_ref)
            raise _fault("InvalidArnException", f"{key_ref} is not a valid KMS key or alias ARN.")
        if key_ref.startswith("alias/"):
            if not allow_alias:
                raise _validation("An alias cannot point to another alias.")
            shown = f"{self._arn_prefix(caller)}:{key_ref}"
            return self._by_alias(caller.account, caller.region, key_ref, shown)
        try:
            canonical = str(uuid.UUID(key_ref))
        except ValueError:
            raise KeyNotFoundError(f"Invalid keyId '{key_ref}'") from None
        shown = f"{self._arn_prefix(caller)}:key/{key_ref}"
        return self._key_in(canonical, caller.account, caller.region, shown)

    def _by_alias(self, account: str, region: str, name: str, shown: str) -> KeyRecord:
        alias = self.store.alias(account, region, name)
        if alias is None:
            raise KeyNotFoundError(f"Alias {shown} is not found.")
        return self._key_in(alias.key_id, account, region, shown)

    def _authorise(
        self,
        action: str,
        caller: Caller,
        record: KeyRecord,
        *,
        context: Mapping[str, str] | None = None,
        recipient: AttestedRecipient | None = None,
        dry_run: bool = False,
    ) -> None:
        from nitrovault.policy import build_request_context, evaluate_key_policy

        request = build_request_context(action, caller.arn, record.arn, context or {},
                                        recipient.pcrs if recipient is not None else None)
        try:
            decision = evaluate_key_policy(record.policy, request)
        except PolicyError as exc:  # a stored policy that the evaluator refuses: deny, never crash
            log.warning("key %s has a policy the evaluator refuses: %s", record.key_id, exc)
            allowed, deny = False, False
        else:
            allowed, deny = decision.allowed, decision.deny
        if recipient is not None:
            self._audit_recipient(action, caller, record.arn, recipient, allowed=allowed,
                                  reason="policy" if allowed else "policy-denied", dry_run=dry_run)
        if not allowed:
            why = ("with an explicit deny in a resource-based policy" if deny
                   else f"because no resource-based policy allows the {action} action")
            raise KeyAccessDeniedError(
                f"User: {caller.arn} is not authorized to perform: {action} on resource: {record.arn} {why}"
            )

    def _audit_recipient(self, action: str, caller: Caller, key: str | None,
                         recipient: AttestedRecipient | None, *, allowed: bool, reason: str,
                         dry_run: bool = False) -> None:
        pcr0 = recipient.pcrs.get(0, b"") if recipient is not None else b""
        self.audit({
            "event": "kms.recipient_decision",
            "time": self.clock().isoformat(),
            "operation": action,
            "principal": caller.arn,
            "key": key,
            "allowed": allowed,
            "reason": reason,
            "module_id": recipient.module_id if recipient is not None else None,
            "pcr0_prefix": pcr0.hex()[:16] if pcr0 else None,
            "dry_run": dry_run,
        })

    @staticmethod
    def _usable(record: KeyRecord) -> None:
        if record.key_state == "Disabled":
            raise KeyUnavailableError(f"{record.arn} is disabled.", code="DisabledException")
        if record.key_state == "PendingDeletion":
            raise _invalid_state(f"{record.arn} is pending deletion.")

    @staticmethod
    def _not_pending(record: KeyRecord) -> None:
        if record.key_state == "PendingDeletion":
            raise _invalid_state(f"{record.arn} is pending deletion.")

    def _validate_policy(self, policy: str, caller: Caller) -> str:
        if len(policy) > 32768:
            raise _fault("LimitExceededException", "The key policy exceeds 32 KB.")
        try:
            doc = json.loads(policy)
        except ValueError:
            raise _fault("MalformedPolicyDocumentException", "The policy is not valid JSON.") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("Statement"), (list, dict)):
            raise _fault("MalformedPolicyDocumentException", "The policy has no Statement.")
        from nitrovault.policy import parse_policy

        try:
            parse_policy(doc)
        except PolicyError as exc:
            raise _fault("MalformedPolicyDocumentException", f"The policy is malformed: {exc}") from None
        return policy

    # -- recipient -----------------------------------------------------------------------------------

    def _recipient(
        self, operation: str, caller: Caller, body: Json, key: str | None
    ) -> AttestedRecipient | None:
        value = body.get("Recipient")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _validation("Recipient must be a structure")
        algorithm = value.get("KeyEncryptionAlgorithm")
        if algorithm != RSAES_OAEP_SHA_256:
            raise _validation(f"KeyEncryptionAlgorithm must be {RSAES_OAEP_SHA_256}")
        document = _blob(value, "AttestationDocument", max_len=262144)
        from nitrovault.attestation import Expectations, verify_document

        try:
            verified = verify_document(
                document,
                at=self.clock(),
                root=self.root,
                expect=Expectations(max_age=self.max_document_age),
                unsafe_allow_debug=self.unsafe_allow_debug_attestation,
            )
        except AttestationError as exc:
            self._audit_recipient(operation, caller, key, None, allowed=False,
                                  reason=f"attestation:{exc.step}", dry_run=body.get("DryRun") is True)
            raise KeyAccessDeniedError(
                f"User: {caller.arn} is not authorized to perform: {operation}: the attestation document "
                f"in Recipient is not valid (failed step: {exc.step})"
            ) from None
        pcrs = {int(i): bytes(v) for i, v in dict(verified.pcrs).items()}
        module_id = verified.document.module_id
        public_key = verified.public_key
        attested = AttestedRecipient(public_key_der=bytes(public_key or b""), pcrs=pcrs, module_id=module_id)
        try:
            loaded = serialization.load_der_public_key(attested.public_key_der)
        except ValueError:
            loaded = None
        if not isinstance(loaded, rsa.RSAPublicKey) or loaded.key_size < 2048:
            self._audit_recipient(operation, caller, key, attested, allowed=False, reason="public-key",
                                  dry_run=body.get("DryRun") is True)
            raise _validation("The attestation document's public_key must be a DER SubjectPublicKeyInfo "
                              "RSA key of at least 2048 bits")
        return attested

    @staticmethod
    def _release(plaintext: bytes, recipient: AttestedRecipient | None) -> Json:
        """``Plaintext`` without a recipient; ``CiphertextForRecipient`` (and no Plaintext) with one."""
        if recipient is None:
            return {"Plaintext": _b64(plaintext)}
        from nitrovault.kms import build_ciphertext_for_recipient

        return {"CiphertextForRecipient": _b64(build_ciphertext_for_recipient(plaintext,
                                                                               recipient.public_key_der))}

    # -- metadata ------------------------------------------------------------------------------------

    @staticmethod
    def key_metadata(record: KeyRecord) -> Json:
        meta: Json = {
            "AWSAccountId": record.account,
            "KeyId": record.key_id,
            "Arn": record.arn,
            "CreationDate": record.creation_date,
            "Enabled": record.key_state == "Enabled",
            "Description": record.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": record.key_state,
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": SYMMETRIC_DEFAULT,
            "KeySpec": SYMMETRIC_DEFAULT,
            "EncryptionAlgorithms": [SYMMETRIC_DEFAULT],
            "MultiRegion": False,
        }
        if record.deletion_date is not None:
            meta["DeletionDate"] = record.deletion_date
            meta["PendingDeletionWindowInDays"] = record.pending_window_days
        return meta

    # -- account-level operations ----------------------------------------------------------------------

    def create_key(self, caller: Caller, body: Json) -> Json:
        for name in ("KeySpec", "CustomerMasterKeySpec"):
            spec = body.get(name)
            if spec not in (None, SYMMETRIC_DEFAULT):
                raise _fault("UnsupportedOperationException",
                             f"The emulator only creates {SYMMETRIC_DEFAULT} keys.")
        if body.get("KeyUsage") not in (None, "ENCRYPT_DECRYPT"):
            raise _fault("UnsupportedOperationException", "The emulator only creates ENCRYPT_DECRYPT keys.")
        if body.get("Origin") not in (None, "AWS_KMS") or body.get("CustomKeyStoreId") \
                or body.get("MultiRegion"):
            raise _fault("UnsupportedOperationException",
                         "The emulator only creates single-Region AWS_KMS keys.")
        policy = _str(body, "Policy")
        description = body.get("Description") or ""
        if not isinstance(description, str) or len(description) > 8192:
            raise _validation("Description must be a string of at most 8192 characters")
        key_id = str(uuid.UUID(bytes=self.random(16), version=4))
        record = KeyRecord(
            key_id=key_id,
            arn=f"{self._arn_prefix(caller)}:key/{key_id}",
            account=caller.account,
            region=caller.region,
            creation_date=self._now(),
            policy=self._validate_policy(policy, caller) if policy else default_key_policy(caller.account),
            description=description,
            materials=(self.random(32),),
        )
        self.store.put(record)
        return {"KeyMetadata": self.key_metadata(record)}

    def list_keys(self, caller: Caller, body: Json) -> Json:
        limit = _int(body, "Limit", 1, 1000) or 100
        records = [r for r in self.store.all_keys()
                   if (r.account, r.region) == (caller.account, caller.region)]
        records = [r for r in (self._refresh(r) for r in records) if r is not None]
        start = self._marker(body)
        page = records[start : start + limit]
        out: Json = {"Keys": [{"KeyId": r.key_id, "KeyArn": r.arn} for r in page],
                     "Truncated": start + limit < len(records)}
        if out["Truncated"]:
            out["NextMarker"] = str(start + limit)
        return out

    @staticmethod
    def _marker(body: Json) -> int:
        marker = body.get("Marker")
        if marker is None:
            return 0
        if not isinstance(marker, str) or not marker.isdigit():
            raise _fault("InvalidMarkerException", "The marker is not valid.")
        return int(marker)

    def list_aliases(self, caller: Caller, body: Json) -> Json:
        limit = _int(body, "Limit", 1, 100) or 50
        key_ref = _str(body, "KeyId")
        target = self._resolve(caller, key_ref, allow_alias=False).key_id if key_ref else None
        entries = []
        for alias in self.store.aliases(caller.account, caller.region):
            record = self.store.get(alias.key_id)
            if record is None or self._refresh(record) is None:
                continue
            if target is not None and alias.key_id != target:
                continue
            entries.append({
                "AliasName": alias.name,
                "AliasArn": alias.arn,
                "TargetKeyId": alias.key_id,
                "CreationDate": alias.created,
                "LastUpdatedDate": alias.created,
            })
        start = self._marker(body)
        out: Json = {"Aliases": entries[start : start + limit], "Truncated": start + limit < len(entries)}
        if out["Truncated"]:
            out["NextMarker"] = str(start + limit)
        return out

    def generate_random(self, caller: Caller, body: Json) -> Json:
        if body.get("CustomKeyStoreId"):
            raise _fault("UnsupportedOperationException", "The emulator has no custom key stores.")
        n = _int(body, "NumberOfBytes", 1, 1024)
        if n is None:
            raise _validation("NumberOfBytes is required")
        recipient = self._recipient("kms:GenerateRandom", caller, body, None)
        if recipient is not None:
            self._audit_recipient("kms:GenerateRandom", caller, None, recipient, allowed=True,
                                  reason="account-level")
        return self._release(self.random(n), recipient)

    # -- key management --------------------------------------------------------------------------------

    def _key_for(self, action: str, caller: Caller, body: Json) -> KeyRecord:
        key_ref = _str(body, "KeyId", required=True)
        record = self._resolve(caller, key_ref)
        self._authorise(action, caller, record)
        return record

    def describe_key(self, caller: Caller, body: Json) -> Json:
        return {"KeyMetadata": self.key_metadata(self._key_for("kms:DescribeKey", caller, body))}

    def create_alias(self, caller: Caller, body: Json) -> Json:
        name = _str(body, "AliasName", required=True)
        target = _str(body, "TargetKeyId", required=True)
        if not _ALIAS_RE.match(name) or name.startswith("alias/aws/"):
            raise _fault("InvalidAliasNameException", f"Alias name {name} is not valid.")
        record = self._resolve(caller, target, allow_alias=False)
        self._authorise("kms:CreateAlias", caller, record)
        self._not_pending(record)
        if record.account != caller.account:  # an alias lives beside its key
            raise _validation("The alias and its target key must be in the same AWS account and Region.")
        alias = AliasRecord(name=name, key_id=record.key_id, created=self._now(), account=caller.account,
                            region=caller.region)
        if self.store.alias(alias.account, alias.region, name) is not None:
            raise _fault("AlreadyExistsException", f"An alias with the name {alias.arn} already exists")
        self.store.put_alias(alias)
        return {}

    def put_key_policy(self, caller: Caller, body: Json) -> Json:
        if body.get("PolicyName", "default") != "default":
            raise _validation("PolicyName must be 'default'")
        policy = _str(body, "Policy", required=True)
        record = self._key_for("kms:PutKeyPolicy", caller, body)
        self._not_pending(record)
        self.store.put(replace(record, policy=self._validate_policy(policy, caller)))
        return {}

    def get_key_policy(self, caller: Caller, body: Json) -> Json:
        if body.get("PolicyName", "default") != "default":
            raise KeyNotFoundError("No such policy exists")
        record = self._key_for("kms:GetKeyPolicy", caller, body)
        self._not_pending(record)
        return {"Policy": record.policy, "PolicyName": "default"}

    def enable_key(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:EnableKey", caller, body)
        self._not_pending(record)
        self.store.put(replace(record, key_state="Enabled"))
        return {}

    def disable_key(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:DisableKey", caller, body)
        self._not_pending(record)
        self.store.put(replace(record, key_state="Disabled"))
        return {}

    def enable_key_rotation(self, caller: Caller, body: Json) -> Json:
        period = _int(body, "RotationPeriodInDays", 90, 2560) or 365
        record = self._key_for("kms:EnableKeyRotation", caller, body)
        self._usable(record)
        self.store.put(replace(record, rotation_enabled=True, rotation_period_days=period,
                               next_rotation_date=self._now() + period * _DAY))
        return {}

    def disable_key_rotation(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:DisableKeyRotation", caller, body)
        self._usable(record)
        self.store.put(replace(record, rotation_enabled=False, next_rotation_date=None))
        return {}

    def get_key_rotation_status(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:GetKeyRotationStatus", caller, body)
        self._not_pending(record)
        out: Json = {"KeyRotationEnabled": record.rotation_enabled, "KeyId": record.arn}
        if record.rotation_enabled:
            out["RotationPeriodInDays"] = record.rotation_period_days
            out["NextRotationDate"] = record.next_rotation_date
        return out

    def rotate_key_on_demand(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:RotateKeyOnDemand", caller, body)
        self._usable(record)
        self.store.put(replace(record, materials=(*record.materials, self.random(32))))
        return {"KeyId": record.arn}

    def schedule_key_deletion(self, caller: Caller, body: Json) -> Json:
        days = _int(body, "PendingWindowInDays", 7, 30) or 30
        record = self._key_for("kms:ScheduleKeyDeletion", caller, body)
        self._not_pending(record)
        when = self._now() + days * _DAY
        self.store.put(replace(record, key_state="PendingDeletion", deletion_date=when,
                               pending_window_days=days))
        return {"KeyId": record.arn, "DeletionDate": when, "KeyState": "PendingDeletion",
                "PendingWindowInDays": days}

    def cancel_key_deletion(self, caller: Caller, body: Json) -> Json:
        record = self._key_for("kms:CancelKeyDeletion", caller, body)
        if record.key_state != "PendingDeletion":
            raise _invalid_state(f"{record.arn} is not pending deletion.")
        self.store.put(replace(record, key_state="Disabled", deletion_date=None, pending_window_days=None))
        return {"KeyId": record.arn}

    # -- cryptographic operations ----------------------------------------------------------------------

    def _seal(self, record: KeyRecord, context: Mapping[str, str], plaintext: bytes) -> bytes:
        return blob.seal(record.materials[record.current_version], key_id=uuid.UUID(record.key_id),
                         material_version=record.current_version, key_arn=record.arn, context=context,
                         plaintext=plaintext, nonce=self.random(blob.NONCE_LEN))

    def _source(self, caller: Caller, body: Json, key_field: str) -> tuple[KeyRecord, blob.ParsedBlob]:
        data = _blob(body, "CiphertextBlob", max_len=6144)
        parsed = blob.parse(data)
        record = self.store.get(str(parsed.key_id))
        if record is not None and record.region != caller.region:
            record = None  # keys are regional: another region's ciphertext means nothing here
        record = self._refresh(record) if record is not None else None
        if record is None:
            raise InvalidCiphertextError("The ciphertext refers to a key that does not exist.")
        key_ref = _str(body, key_field)
        if key_ref is not None and self._resolve(caller, key_ref).key_id != record.key_id:
            raise _fault("IncorrectKeyException",
                         "The key ID in the request does not identify a CMK that can perform this operation.")
        return record, parsed

    @staticmethod
    def _open(record: KeyRecord, parsed: blob.ParsedBlob, context: Mapping[str, str]) -> bytes:
        if parsed.material_version >= len(record.materials):
            raise InvalidCiphertextError("The ciphertext is invalid.")
        return blob.open_blob(record.materials[parsed.material_version], parsed, key_arn=record.arn,
                              context=context)

    def encrypt(self, caller: Caller, body: Json) -> Json:
        plaintext = _blob(body, "Plaintext", max_len=4096)
        context = _context(body)
        algorithm = _algorithm(body)
        key_ref = _str(body, "KeyId", required=True)
        dry_run = _dry_run(body)
        record = self._resolve(caller, key_ref)
        self._authorise("kms:Encrypt", caller, record, context=context)
        self._usable(record)
        _finish_dry_run(dry_run)
        return {"CiphertextBlob": _b64(self._seal(record, context, plaintext)), "KeyId": record.arn,
                "EncryptionAlgorithm": algorithm}

    def decrypt(self, caller: Caller, body: Json) -> Json:
        context = _context(body)
        algorithm = _algorithm(body)
        dry_run = _dry_run(body)
        record, parsed = self._source(caller, body, "KeyId")
        recipient = self._recipient("kms:Decrypt", caller, body, record.arn)
        self._authorise("kms:Decrypt", caller, record, context=context, recipient=recipient,
                        dry_run=dry_run)
        self._usable(record)
        plaintext = self._open(record, parsed, context)
        _finish_dry_run(dry_run)
        return {"KeyId": record.arn, "EncryptionAlgorithm": algorithm, **self._release(plaintext, recipient)}

    def re_encrypt(self, caller: Caller, body: Json) -> Json:
        source_context = _context(body, "SourceEncryptionContext")
        dest_context = _context(body, "DestinationEncryptionContext")
        _algorithm(body, "SourceEncryptionAlgorithm")
        _algorithm(body, "DestinationEncryptionAlgorithm")
        dry_run = _dry_run(body)
        source, parsed = self._source(caller, body, "SourceKeyId")
        dest_ref = _str(body, "DestinationKeyId", required=True)
        dest = self._resolve(caller, dest_ref)
        self._authorise("kms:ReEncryptFrom", caller, source, context=source_context)
        self._authorise("kms:ReEncryptTo", caller, dest, context=dest_context)
        self._usable(source)
        self._usable(dest)
        plaintext = self._open(source, parsed, source_context)
        _finish_dry_run(dry_run)
        return {"CiphertextBlob": _b64(self._seal(dest, dest_context, plaintext)), "SourceKeyId": source.arn,
                "KeyId": dest.arn, "SourceEncryptionAlgorithm": SYMMETRIC_DEFAULT,
                "DestinationEncryptionAlgorithm": SYMMETRIC_DEFAULT}

    def _data_key(self, action: str, caller: Caller, body: Json,
                  recipient: AttestedRecipient | None = None, *, with_recipient: bool = False) -> Json:
        context = _context(body)
        n = _int(body, "NumberOfBytes", 1, 1024)
        spec = body.get("KeySpec")
        if (n is None) == (spec is None):
            raise _validation("Please specify either number of bytes or key spec.")
        if spec is not None:
            sizes = {"AES_256": 32, "AES_128": 16}
            if spec not in sizes:
                raise _validation(f"KeySpec must be one of {sorted(sizes)}")
            n = sizes[spec]
        assert n is not None
        key_ref = _str(body, "KeyId", required=True)
        dry_run = _dry_run(body)
        record = self._resolve(caller, key_ref)
        if with_recipient:
            recipient = self._recipient(action, caller, body, record.arn)
        self._authorise(action, caller, record, context=context, recipient=recipient, dry_run=dry_run)
        self._usable(record)
        _finish_dry_run(dry_run)
        data_key = self.random(n)
        out: Json = {"CiphertextBlob": _b64(self._seal(record, context, data_key)), "KeyId": record.arn}
        if action == "kms:GenerateDataKey":
            out.update(self._release(data_key, recipient))
        return out

    def generate_data_key(self, caller: Caller, body: Json) -> Json:
        return self._data_key("kms:GenerateDataKey", caller, body, with_recipient=True)

    def generate_data_key_without_plaintext(self, caller: Caller, body: Json) -> Json:
        return self._data_key("kms:GenerateDataKeyWithoutPlaintext", caller, body)
