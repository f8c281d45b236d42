"""Talking to the Nitro Security Module: CBOR requests and responses over a pluggable transport.

The NSM protocol (aws/aws-nitro-enclaves-nsm-api ``src/api/mod.rs`` and ``src/driver/mod.rs``) is one
CBOR-encoded ``Request`` in, one CBOR-encoded ``Response`` out, both serde *externally tagged* enums:

* a unit variant is a bare text string: ``"DescribeNSM"``, ``"GetRandom"``; answers ``"LockPCR"``, ...
* a struct variant is a one-entry map: ``{"DescribePCR": {"index": 3}}`` -> ``{"DescribePCR": {"lock":
  true, "data": h'..'}}``;
* an error is ``{"Error": "InvalidIndex"}``, raised here as :class:`~nitrovault.errors.NsmError` with
  ``code`` set to the name.

:class:`Nsm` is the pure codec; it never touches a device. :class:`DeviceTransport` is the production
transport (the ``/dev/nsm`` ioctl, used only inside an enclave); ``nitrovault.local.nsm.LocalNsmDevice``
is the local one, in process or behind :class:`UnixSocketTransport` (length-framed CBOR over a unix
socket, for a local enclave process that must not import ``nitrovault.local``). All satisfy
:class:`NsmTransport`, so enclave code runs unchanged over any of them.

Invariants:

* ``user_data``, ``nonce`` and ``public_key`` are at most 1024 bytes each and an encoded request is at
  most 0x1000 bytes; larger inputs fail client-side with ``NsmError(code="InputTooLarge")``, like the
  Rust driver, before anything reaches the transport.
* A response that is not CBOR, or is not the variant the request calls for, is ``InvalidResponse``.
* Nothing here logs or puts request/response contents into an exception message.

We hand-write this (about 150 lines) rather than depend on ``aws-nsm-interface``: that package is a thin
ioctl wrapper without a transport seam, so it cannot be driven by the local fake device.

Example (with the local stand-in)::

    from nitrovault.local.nsm import make_local_nsm
    nsm = make_local_nsm("/tmp/pki", pcrs={})
    doc = nsm.attestation(nonce=b"n" * 16, public_key=der)   # raw COSE_Sign1 bytes
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import cbor2

from nitrovault.errors import NsmError

__all__ = [
    "MAX_AUX_LEN",
    "MAX_REQUEST_LEN",
    "MAX_RESPONSE_LEN",
    "NSM_IOCTL_REQUEST",
    "DeviceTransport",
    "Nsm",
    "NsmDescription",
    "NsmTransport",
    "PcrState",
    "UnixSocketTransport",
]

#: Largest ``user_data`` / ``nonce`` / ``public_key`` the NSM accepts (AWS CDDL ``bytes .size (0..1024)``).
MAX_AUX_LEN = 1024
#: ``NSM_REQUEST_MAX_SIZE`` in nsm-api ``src/driver/mod.rs``.
MAX_REQUEST_LEN = 0x1000
#: ``NSM_RESPONSE_MAX_SIZE`` in nsm-api ``src/driver/mod.rs``.
MAX_RESPONSE_LEN = 0x3000


class NsmTransport(Protocol):
    """One CBOR request in, one CBOR response out: the contract of the ``/dev/nsm`` ioctl."""

    def call(self, request: bytes) -> bytes: ...


@dataclass(frozen=True)
class PcrState:
    """One platform configuration register."""

    #: True when the PCR can no longer be extended (PCR0..15 always; 16..31 once locked).
    locked: bool
    #: The current value (48 bytes for the SHA384 bank).
    data: bytes


@dataclass(frozen=True)
class NsmDescription:
    """The answer to ``DescribeNSM``."""

    version_major: int
    version_minor: int
    version_patch: int
    #: The module id that also appears in every attestation document (``i-...-enc...``).
    module_id: str
    #: How many PCRs the module exposes (32 on Nitro).
    max_pcrs: int
    #: Indices of the read-only PCRs.
    locked_pcrs: frozenset[int]
    #: The PCR bank digest: ``"SHA384"`` on Nitro.
    digest: str


def _check_aux(name: str, value: bytes | None) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise NsmError(f"{name} must be bytes", code="InvalidArgument")
    value = bytes(value)
    if len(value) > MAX_AUX_LEN:
        raise NsmError(f"{name} is {len(value)} bytes; the NSM accepts at most {MAX_AUX_LEN}",
                       code="InputTooLarge")
    return value


def _check_index(index: int) -> int:
    # Request indices are u16 on the wire; anything else could not be deserialised by the NSM.
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**16:
        raise NsmError("PCR index must be an integer in [0, 65536)", code="InvalidArgument")
    return index


class Nsm:
    """The NSM client: encodes requests, decodes responses, raises :class:`NsmError` on ``{"Error": ..}``."""

    def __init__(self, transport: NsmTransport) -> None:
        self._transport = transport

    # -- the seven requests --------------------------------------------------------------------------

    def attestation(self, *, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """Ask for a signed attestation document; returns the raw COSE_Sign1 bytes."""
        body = {
            # Field order of nsm-api's ``Request::Attestation``; serde_cbor keeps declaration order.
            "user_data": _check_aux("user_data", user_data),
            "nonce": _check_aux("nonce", nonce),
            "public_key": _check_aux("public_key", public_key),
        }
        answer = self._struct(self._call({"Attestation": body}), "Attestation")
        return _field_bytes(answer, "document")

    def describe_pcr(self, index: int) -> PcrState:
        answer = self._struct(self._call({"DescribePCR": {"index": _check_index(index)}}), "DescribePCR")
        lock = answer.get("lock")
        if not isinstance(lock, bool):
            raise NsmError("DescribePCR answer has no boolean 'lock'", code="InvalidResponse")
        return PcrState(locked=lock, data=_field_bytes(answer, "data"))

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data``; returns the new value."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise NsmError("data must be bytes", code="InvalidArgument")
        request = {"ExtendPCR": {"index": _check_index(index), "data": bytes(data)}}
        return _field_bytes(self._struct(self._call(request), "ExtendPCR"), "data")

    def lock_pcr(self, index: int) -> None:
        self._unit(self._call({"LockPCR": {"index": _check_index(index)}}), "LockPCR")

    def lock_pcrs(self, range_: int) -> None:
        """Lock PCRs ``[0, range_)``."""
        self._unit(self._call({"LockPCRs": {"range": _check_index(range_)}}), "LockPCRs")

    def describe_nsm(self) -> NsmDescription:
        a = self._struct(self._call("DescribeNSM"), "DescribeNSM")
        try:
            locked = a["locked_pcrs"]
            desc = NsmDescription(
                version_major=_int(a["version_major"]),
                version_minor=_int(a["version_minor"]),
                version_patch=_int(a["version_patch"]),
                module_id=_str(a["module_id"]),
                max_pcrs=_int(a["max_pcrs"]),
                locked_pcrs=frozenset(_int(i) for i in locked),
                digest=_str(a["digest"]),
            )
        except (KeyError, TypeError, ValueError):
            raise NsmError("DescribeNSM answer is malformed", code="InvalidResponse") from None
        return desc

    def get_random(self) -> bytes:
        """Entropy from the NSM (256 bytes per call on Nitro)."""
        return _field_bytes(self._struct(self._call("GetRandom"), "GetRandom"), "random")

    # -- codec ---------------------------------------------------------------------------------------

    def _call(self, request: object) -> Any:
        encoded = cbor2.dumps(request)
        if len(encoded) > MAX_REQUEST_LEN:
            raise NsmError(f"request is {len(encoded)} bytes; the NSM accepts at most {MAX_REQUEST_LEN}",
                           code="InputTooLarge")
        raw = self._transport.call(encoded)
        try:
            response = cbor2.loads(raw)
        except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError):
            raise NsmError("NSM answer is not CBOR", code="InvalidResponse") from None
        if isinstance(response, dict) and set(response) == {"Error"}:
            code = response["Error"]
            code = code if isinstance(code, str) else "InternalError"
            raise NsmError(f"NSM answered {code}", code=code)
        return response

    @staticmethod
    def _struct(response: Any, variant: str) -> Mapping[str, Any]:
        if isinstance(response, dict) and len(response) == 1 and isinstance(response.get(variant), dict):
            body: Mapping[str, Any] = response[variant]
            return body
        raise NsmError(f"NSM answer is not a {variant} response", code="InvalidResponse")

    @staticmethod
    def _unit(response: Any, variant: str) -> None:
        if response != variant:
            raise NsmError(f"NSM answer is not a {variant} response", code="InvalidResponse")


def _field_bytes(body: Mapping[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes):
        raise NsmError(f"NSM answer has no byte string {name!r}", code="InvalidResponse")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("not an integer")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


# -- the real device ---------------------------------------------------------------------------------


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _NsmMessage(ctypes.Structure):
    """``struct nsm_message { struct iovec request; struct iovec response; }`` (nsm-api driver)."""

    _fields_ = [("request", _IoVec), ("response", _IoVec)]


def _iowr(magic: int, nr: int, size: int) -> int:
    # Linux asm-generic/ioctl.h: dir(2 bits: read|write = 3) << 30 | size(14) << 16 | type(8) << 8 | nr(8)
    return (3 << 30) | (size << 16) | (magic << 8) | nr


#: ``_IOWR(0x0A, 0, sizeof(struct nsm_message))``: 0xC0200A00 on 64-bit Linux.
NSM_IOCTL_REQUEST = _iowr(0x0A, 0, ctypes.sizeof(_NsmMessage))


class DeviceTransport:
    """The ``/dev/nsm`` ioctl. Production only: it exists inside a Nitro Enclave and nowhere else.

    The device is opened for each call (the driver serialises requests; no descriptor outlives a call).
    """

    def __init__(self, path: str = "/dev/nsm") -> None:
        self._path = path

    def call(self, request: bytes) -> bytes:
        if len(request) > MAX_REQUEST_LEN:
            raise NsmError("request too large for the NSM", code="InputTooLarge")
        req_buf = ctypes.create_string_buffer(request, len(request))
        resp_buf = ctypes.create_string_buffer(MAX_RESPONSE_LEN)
        message = _NsmMessage(
            _IoVec(ctypes.cast(req_buf, ctypes.c_void_p), len(request)),
            _IoVec(ctypes.cast(resp_buf, ctypes.c_void_p), MAX_RESPONSE_LEN),
        )
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(f"cannot open {self._path} ({errno.errorcode.get(exc.errno or 0, '?')})",
                           code="InternalError") from None
        try:
            # mutate_flag=True: the driver writes the response length back into message.response.
            fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message, True)
        except OSError as exc:
            # nsm-api driver: EMSGSIZE means the input was too large; anything else is internal.
            code = "InputTooLarge" if exc.errno == errno.EMSGSIZE else "InternalError"
            raise NsmError(f"NSM ioctl failed ({errno.errorcode.get(exc.errno or 0, '?')})",
                           code=code) from None
        finally:
            os.close(fd)
        length = int(message.response.iov_len)
        if not 0 < length <= MAX_RESPONSE_LEN:
            raise NsmError("NSM returned an impossible response length", code="InvalidResponse")
        return resp_buf.raw[:length]


class UnixSocketTransport:
    """The local stand-in's transport: the same CBOR request/response, over a unix socket.

    Used by the enclave process when it runs locally (served by ``nitrovault.local.nsm_service``), so the
    enclave never imports ``nitrovault.local``. Framing, per call on a fresh connection: a 4-byte
    big-endian length, then the bytes; the answer comes back framed the same way. ``@name`` is an
    abstract socket (Linux): it lives in a network namespace, not in a folder, so only processes in the
    enclave's namespace can reach it.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self._path = unix_socket_address(os.fspath(path))
        self._timeout = timeout

    def call(self, request: bytes) -> bytes:
        if len(request) > MAX_REQUEST_LEN:
            raise NsmError("request too large for the NSM", code="InputTooLarge")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self._timeout)
                sock.connect(self._path)
                sock.sendall(struct.pack(">I", len(request)) + request)
                (length,) = struct.unpack(">I", _recv_exact(sock, 4))
                if not 0 < length <= MAX_RESPONSE_LEN:
                    raise NsmError("NSM returned an impossible response length", code="InvalidResponse")
                return _recv_exact(sock, length)
        except OSError as exc:
            raise NsmError(f"local NSM socket failed ({type(exc).__name__})", code="InternalError") from None


def unix_socket_address(path: str) -> str:
    """``@name`` (an abstract socket, as ``ss`` prints it) as Python's ``"\\0name"``; paths unchanged."""
    return "\0" + path[1:] if path.startswith("@") else path


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise NsmError("local NSM closed the connection early", code="InvalidResponse")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
