"""A local stand-in for ``/dev/nsm``: answers NSM CBOR requests and signs real-format attestation documents.

:class:`LocalNsmDevice` implements :class:`nitrovault.nsm.NsmTransport`, so the production
:class:`nitrovault.nsm.Nsm` client (and every enclave code path above it) runs unchanged through it.

Semantics follow nsm-api (``src/api/mod.rs``) and what real enclaves show:

* 32 PCRs of 48 bytes (SHA384 bank). PCR0..15 are set at boot (from ``pcrs``; unset ones are zero) and
  are read-only: ``ExtendPCR``/``LockPCR`` on them answer ``ReadOnlyIndex``. PCR16..31 start at zero (or
  the given value), can be extended (``new = SHA384(old || data)``) until locked; extending a locked one
  is ``ReadOnlyIndex``; locking is idempotent. ``LockPCRs {range}`` locks ``[0, range)``. An index
  ``>= 32`` is ``InvalidIndex``.
* ``GetRandom`` returns 256 bytes from ``rng``. ``DescribeNSM`` reports version 1.0.0, 32 PCRs, digest
  SHA384. An unknown request is ``InvalidOperation``; undecodable or ill-typed input ``InvalidArgument``;
  a request over 0x1000 bytes or an aux field over 1024 bytes ``InputTooLarge``.
* Documents are untagged ``COSE_Sign1 [h'a1013822', {}, payload, sig]`` with a 96-byte raw ``r||s``
  ES384 signature, the payload a map with all nine keys in AWS's order; absent optional fields are CBOR
  null, as in real documents. ``pcrs`` holds PCR0..15 (real documents always show exactly those) plus
  any PCR16..31 the application has locked (nsm-api: "Map of all locked PCRs") **[inferred]**.
* Each document gets its own freshly issued 3-hour leaf from :class:`nitrovault.local.pki.LocalPki`.

Time (``clock``) and randomness (``rng``) are parameters. The device holds mutable PCR state behind a
lock, like the real module; it never logs request contents.

Example::

    nsm = make_local_nsm(Path("/tmp/pki"), measure_enclave(repo, lock).as_pcrs())
    document = nsm.attestation(public_key=recipient.public_key_der, nonce=os.urandom(32))
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import MAX_AUX_LEN, MAX_REQUEST_LEN, Nsm

__all__ = [
    "DEFAULT_MODULE_ID",
    "MAX_PCRS",
    "PCR_LEN",
    "RANDOM_LEN",
    "LocalNsmDevice",
    "make_local_nsm",
    "sign_cose_es384",
]

PCR_LEN = 48
MAX_PCRS = 32
#: PCR0..15 are measured at boot and read-only; 16..31 belong to the application.
BOOT_PCRS = 16
RANDOM_LEN = 256
PROTECTED_ES384 = b"\xa1\x01\x38\x22"  # {1: -35}, the exact 4 bytes real documents carry
DEFAULT_MODULE_ID = "i-00000000000000001-enc0000000000000001"
NSM_VERSION = (1, 0, 0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _NsmFailure(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def sign_cose_es384(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Untagged COSE_Sign1 over ``payload`` with the ES384 protected header and a raw r||s signature."""
    to_sign = cbor2.dumps(["Signature1", PROTECTED_ES384, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    return cbor2.dumps([PROTECTED_ES384, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


class LocalNsmDevice:
    """An in-process ``/dev/nsm``: ``call(cbor_request) -> cbor_response``."""

    def __init__(self, pki: LocalPki, *, pcrs: Mapping[int, bytes], module_id: str = DEFAULT_MODULE_ID,
                 clock: Clock = utc_now, rng: Callable[[int], bytes] = os.urandom) -> None:
        if not module_id:
            raise ConfigError("module_id must not be empty")
        self._pki = pki
        self._module_id = module_id
        self._clock = clock
        self._rng = rng
        self._pcrs = [bytes(PCR_LEN) for _ in range(MAX_PCRS)]
        for index, value in pcrs.items():
            if not 0 <= index < MAX_PCRS:
                raise ConfigError(f"PCR index {index} is outside 0..{MAX_PCRS - 1}")
            if len(value) != PCR_LEN:
                raise ConfigError(f"PCR{index} must be {PCR_LEN} bytes, got {len(value)}")
            self._pcrs[index] = bytes(value)
        self._locked = set(range(BOOT_PCRS))
        self._mutex = threading.Lock()

    @property
    def module_id(self) -> str:
        return self._module_id

    def call(self, request: bytes) -> bytes:
        try:
            answer: object = self._dispatch(request)
        except _NsmFailure as failure:
            answer = {"Error": failure.code}
        return cbor2.dumps(answer)

    # -- dispatch ------------------------------------------------------------------------------------

    def _dispatch(self, raw: bytes) -> object:
        if len(raw) > MAX_REQUEST_LEN:
            raise _NsmFailure("InputTooLarge")
        try:
            request = cbor2.loads(raw)
        except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError):
            raise _NsmFailure("InvalidArgument") from None
        if request == "DescribeNSM":
            return self._describe_nsm()
        if request == "GetRandom":
            return {"GetRandom": {"random": self._rng(RANDOM_LEN)}}
        if not (isinstance(request, dict) and len(request) == 1):
            raise _NsmFailure("InvalidOperation")
        ((name, body),) = request.items()
        handler = {
            "Attestation": self._attestation,
            "DescribePCR": self._describe_pcr,
            "ExtendPCR": self._extend_pcr,
            "LockPCR": self._lock_pcr,
            "LockPCRs": self._lock_pcrs,
        }.get(name) if isinstance(name, str) else None
        if handler is None:
            raise _NsmFailure("InvalidOperation")
        if not isinstance(body, dict):
            raise _NsmFailure("InvalidArgument")
        with self._mutex:
            return handler(body)

    def _describe_nsm(self) -> object:
        with self._mutex:
            locked = sorted(self._locked)
        major, minor, patch = NSM_VERSION
        return {"DescribeNSM": {
            "version_major": major, "version_minor": minor, "version_patch": patch,
            "module_id": self._module_id, "max_pcrs": MAX_PCRS, "locked_pcrs": locked, "digest": "SHA384",
        }}

    def _describe_pcr(self, body: dict[str, Any]) -> object:
        index = _pcr_index(body, "index")
        return {"DescribePCR": {"lock": index in self._locked, "data": self._pcrs[index]}}

    def _extend_pcr(self, body: dict[str, Any]) -> object:
        index = _pcr_index(body, "index")
        data = body.get("data")
        if not isinstance(data, bytes):
            raise _NsmFailure("InvalidArgument")
        if index in self._locked:
            raise _NsmFailure("ReadOnlyIndex")
        self._pcrs[index] = hashlib.sha384(self._pcrs[index] + data).digest()
        return {"ExtendPCR": {"data": self._pcrs[index]}}

    def _lock_pcr(self, body: dict[str, Any]) -> object:
        index = _pcr_index(body, "index")
        if index < BOOT_PCRS:
            raise _NsmFailure("ReadOnlyIndex")
        self._locked.add(index)
        return "LockPCR"

    def _lock_pcrs(self, body: dict[str, Any]) -> object:
        range_ = body.get("range")
        if isinstance(range_, bool) or not isinstance(range_, int) or range_ < 0:
            raise _NsmFailure("InvalidArgument")
        if range_ > MAX_PCRS:
            raise _NsmFailure("InvalidIndex")
        self._locked.update(range(range_))
        return "LockPCRs"

    def _attestation(self, body: dict[str, Any]) -> object:
        fields = {name: body.get(name) for name in ("user_data", "nonce", "public_key")}
        for value in fields.values():
            if value is not None and not isinstance(value, bytes):
                raise _NsmFailure("InvalidArgument")
            if value is not None and len(value) > MAX_AUX_LEN:
                raise _NsmFailure("InputTooLarge")
        return {"Attestation": {"document": self._document(**fields)}}

    # -- documents -----------------------------------------------------------------------------------

    def _document(self, *, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None) -> bytes:
        at = self._clock()
        cert, key = self._pki.issue_leaf(self._module_id, at)
        shown = sorted(set(range(BOOT_PCRS)) | self._locked)
        payload = cbor2.dumps({
            # the key order of AWS's documents; cbor2 keeps insertion order.
            "module_id": self._module_id,
            "digest": "SHA384",
            "timestamp": (at - _EPOCH) // timedelta(milliseconds=1),
            "pcrs": {i: self._pcrs[i] for i in shown},
            "certificate": cert.public_bytes(serialization.Encoding.DER),
            "cabundle": self._pki.cabundle,
            "public_key": public_key,
            "user_data": user_data,
            "nonce": nonce,
        })
        return sign_cose_es384(payload, key)


def _pcr_index(body: Mapping[str, Any], name: str) -> int:
    index = body.get(name)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise _NsmFailure("InvalidArgument")
    if index >= MAX_PCRS:
        raise _NsmFailure("InvalidIndex")
    return index


def make_local_nsm(pki_dir: Path | str, pcrs: Mapping[int, bytes], *, module_id: str = DEFAULT_MODULE_ID,
                   clock: Clock = utc_now, rng: Callable[[int], bytes] = os.urandom) -> Nsm:
    """An :class:`~nitrovault.nsm.Nsm` client over a local device whose PKI lives in ``pki_dir``."""
    pki = LocalPki.ensure(pki_dir, clock=clock)
    return Nsm(LocalNsmDevice(pki, pcrs=pcrs, module_id=module_id, clock=clock, rng=rng))
