"""The NSM client codec (``nitrovault.nsm.Nsm``) against a tiny recording transport: exact request bytes,
response decoding, error mapping, and client-side size checks."""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

import nitrovault.nsm as nsm_module
from nitrovault.errors import NsmError
from nitrovault.nsm import (
    MAX_AUX_LEN,
    NSM_IOCTL_REQUEST,
    DeviceTransport,
    Nsm,
    NsmDescription,
    PcrState,
    UnixSocketTransport,
    _NsmMessage,
)


class Recorder:
    """A 10-line transport: remembers each request, answers with a canned CBOR value."""

    def __init__(self, answer: object, *, raw: bytes | None = None) -> None:
        self.answer = answer
        self.raw = raw
        self.requests: list[bytes] = []

    def call(self, request: bytes) -> bytes:
        self.requests.append(request)
        return self.raw if self.raw is not None else cbor2.dumps(self.answer)


def text(s: str) -> bytes:
    """CBOR text string header + bytes (all our strings are < 24 bytes)."""
    assert len(s) < 24
    return bytes([0x60 + len(s)]) + s.encode()


# -- exact request bytes ------------------------------------------------------------------------------


def test_attestation_request_bytes_are_serde_externally_tagged() -> None:
    t = Recorder({"Attestation": {"document": b"doc"}})
    assert Nsm(t).attestation(nonce=b"\x01\x02") == b"doc"
    # {"Attestation": {"user_data": null, "nonce": h'0102', "public_key": null}}, in this field order
    expected = (
        b"\xa1"
        + text("Attestation")
        + b"\xa3"
        + text("user_data")
        + b"\xf6"
        + text("nonce")
        + b"\x42\x01\x02"
        + text("public_key")
        + b"\xf6"
    )
    assert t.requests == [expected]
    body = {"user_data": None, "nonce": b"\x01\x02", "public_key": None}
    assert cbor2.loads(expected) == {"Attestation": body}


def test_unit_variants_are_bare_strings() -> None:
    t = Recorder({"GetRandom": {"random": b"r" * 256}})
    assert Nsm(t).get_random() == b"r" * 256
    assert t.requests == [text("GetRandom")]


def test_describe_pcr_request_and_response() -> None:
    t = Recorder({"DescribePCR": {"lock": True, "data": b"\x07" * 48}})
    assert Nsm(t).describe_pcr(3) == PcrState(locked=True, data=b"\x07" * 48)
    assert t.requests == [b"\xa1" + text("DescribePCR") + b"\xa1" + text("index") + b"\x03"]


def test_extend_lock_and_lock_range_requests() -> None:
    t = Recorder({"ExtendPCR": {"data": b"\x09" * 48}})
    assert Nsm(t).extend_pcr(16, b"ab") == b"\x09" * 48
    assert cbor2.loads(t.requests[0]) == {"ExtendPCR": {"index": 16, "data": b"ab"}}

    t = Recorder("LockPCR")
    Nsm(t).lock_pcr(17)
    assert t.requests == [b"\xa1" + text("LockPCR") + b"\xa1" + text("index") + b"\x11"]

    t = Recorder("LockPCRs")
    Nsm(t).lock_pcrs(20)
    assert cbor2.loads(t.requests[0]) == {"LockPCRs": {"range": 20}}


def test_describe_nsm_decodes_every_field() -> None:
    t = Recorder(
        {
            "DescribeNSM": {
                "version_major": 1,
                "version_minor": 2,
                "version_patch": 3,
                "module_id": "i-1-enc2",
                "max_pcrs": 32,
                "locked_pcrs": [0, 1, 2],
                "digest": "SHA384",
            }
        }
    )
    assert Nsm(t).describe_nsm() == NsmDescription(1, 2, 3, "i-1-enc2", 32, frozenset({0, 1, 2}), "SHA384")
    assert t.requests == [text("DescribeNSM")]


# -- responses that are errors or malformed -----------------------------------------------------------


@pytest.mark.parametrize("code", ["InvalidIndex", "ReadOnlyIndex", "InvalidOperation", "InternalError"])
def test_error_response_raises_nsm_error_with_code(code: str) -> None:
    with pytest.raises(NsmError) as info:
        Nsm(Recorder({"Error": code})).describe_pcr(40)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("answer", "raw"),
    [
        (None, b"\xff\xff not cbor"),  # not CBOR
        ({"ExtendPCR": {"data": b"x"}}, None),  # the wrong variant
        ({"DescribePCR": {"lock": 1, "data": b"x"}}, None),  # lock is not a bool
        ({"DescribePCR": {"lock": True}}, None),  # data missing
        ("DescribePCR", None),  # unit where a struct is due
    ],
)
def test_malformed_answer_is_invalid_response(answer: object, raw: bytes | None) -> None:
    with pytest.raises(NsmError) as info:
        Nsm(Recorder(answer, raw=raw)).describe_pcr(0)
    assert info.value.code == "InvalidResponse"


def test_unit_answer_must_be_the_right_unit() -> None:
    with pytest.raises(NsmError) as info:
        Nsm(Recorder("LockPCRs")).lock_pcr(16)
    assert info.value.code == "InvalidResponse"


def test_describe_nsm_missing_field_is_invalid_response() -> None:
    with pytest.raises(NsmError) as info:
        Nsm(Recorder({"DescribeNSM": {"version_major": 1}})).describe_nsm()
    assert info.value.code == "InvalidResponse"


# -- client-side checks: nothing reaches the transport -------------------------------------------------


@pytest.mark.parametrize("field", ["user_data", "nonce", "public_key"])
def test_aux_field_over_1024_bytes_is_input_too_large(field: str) -> None:
    t = Recorder({"Attestation": {"document": b"d"}})
    Nsm(t).attestation(**{field: b"x" * MAX_AUX_LEN})  # exactly the limit is fine
    with pytest.raises(NsmError) as info:
        Nsm(t).attestation(**{field: b"x" * (MAX_AUX_LEN + 1)})
    assert info.value.code == "InputTooLarge"
    assert len(t.requests) == 1


def test_request_over_0x1000_bytes_is_input_too_large() -> None:
    t = Recorder({"ExtendPCR": {"data": b"x" * 48}})
    with pytest.raises(NsmError) as info:
        Nsm(t).extend_pcr(16, b"x" * 0x1000)
    assert info.value.code == "InputTooLarge"
    assert t.requests == []


@pytest.mark.parametrize("index", [-1, 2**16, True])
def test_index_outside_u16_is_invalid_argument(index: int) -> None:
    t = Recorder({"DescribePCR": {"lock": True, "data": b""}})
    with pytest.raises(NsmError) as info:
        Nsm(t).describe_pcr(index)
    assert info.value.code == "InvalidArgument"
    assert t.requests == []


def test_secret_inputs_never_appear_in_error_messages() -> None:
    secret = b"S3CRET" * 200
    with pytest.raises(NsmError) as info:
        Nsm(Recorder({})).attestation(user_data=secret)
    assert "S3CRET" not in str(info.value) and "S3CRET" not in info.value.diagnostics()


# -- the ioctl constants ---------------------------------------------------------------------------------


def test_ioctl_request_code_matches_the_nsm_driver() -> None:
    assert ctypes.sizeof(_NsmMessage) == 32  # two struct iovec on 64-bit Linux
    assert NSM_IOCTL_REQUEST == 0xC0200A00


def test_device_transport_without_a_device_is_internal_error(tmp_path: Path) -> None:
    with pytest.raises(NsmError) as info:
        DeviceTransport(str(tmp_path / "no-such-nsm")).call(cbor2.dumps("DescribeNSM"))
    assert info.value.code == "InternalError"


def test_device_transport_rejects_a_non_nsm_file(tmp_path: Path) -> None:
    # A regular file does not implement the ioctl: the kernel answers ENOTTY, mapped to InternalError.
    path = tmp_path / "plain"
    path.write_bytes(b"")
    with pytest.raises(NsmError) as info:
        DeviceTransport(str(path)).call(cbor2.dumps("DescribeNSM"))
    assert info.value.code == "InternalError"


class FakeDriver:
    """Stands in for the kernel side of the ioctl: reads the request iovec, fills the response iovec."""

    def __init__(self, answer: bytes, *, errno_: int | None = None) -> None:
        self.answer = answer
        self.errno_ = errno_
        self.seen: list[tuple[int, bytes]] = []

    def ioctl(self, fd: int, request: int, arg: _NsmMessage, mutate: bool) -> int:
        assert mutate and isinstance(arg, _NsmMessage)
        self.seen.append((request, ctypes.string_at(arg.request.iov_base, arg.request.iov_len)))
        if self.errno_ is not None:
            raise OSError(self.errno_, "fake")
        assert arg.response.iov_len == 0x3000
        ctypes.memmove(arg.response.iov_base, self.answer, len(self.answer))
        arg.response.iov_len = len(self.answer)
        return 0


def test_device_transport_passes_iovecs_and_reads_back_the_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = tmp_path / "nsm"
    dev.write_bytes(b"")
    answer = cbor2.dumps({"GetRandom": {"random": b"\x05" * 256}})
    driver = FakeDriver(answer)
    monkeypatch.setattr(nsm_module.fcntl, "ioctl", driver.ioctl)
    assert Nsm(DeviceTransport(str(dev))).get_random() == b"\x05" * 256
    assert driver.seen == [(0xC0200A00, cbor2.dumps("GetRandom"))]


@pytest.mark.parametrize(
    ("errno_", "code"), [(errno.EMSGSIZE, "InputTooLarge"), (errno.EIO, "InternalError")]
)
def test_device_transport_maps_ioctl_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, code: str
) -> None:
    dev = tmp_path / "nsm"
    dev.write_bytes(b"")
    monkeypatch.setattr(nsm_module.fcntl, "ioctl", FakeDriver(b"", errno_=errno_).ioctl)
    with pytest.raises(NsmError) as info:
        DeviceTransport(str(dev)).call(cbor2.dumps("GetRandom"))
    assert info.value.code == code


# -- the unix-socket transport (local enclave process -> local NSM service) ---------------------------


def _serve_once(path: Path, reply: Callable[[bytes], bytes]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        with server, server.accept()[0] as conn:
            (length,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            conn.sendall(reply(conn.recv(length, socket.MSG_WAITALL)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_unix_socket_transport_frames_request_and_response(tmp_path: Path) -> None:
    answer = cbor2.dumps({"GetRandom": {"random": b"\x01" * 256}})
    seen: list[bytes] = []

    def reply(request: bytes) -> bytes:
        seen.append(request)
        return struct.pack(">I", len(answer)) + answer

    thread = _serve_once(tmp_path / "nsm.sock", reply)
    assert Nsm(UnixSocketTransport(tmp_path / "nsm.sock")).get_random() == b"\x01" * 256
    thread.join(5)
    assert seen == [cbor2.dumps("GetRandom")]


@pytest.mark.parametrize(("framed", "code"), [
    (struct.pack(">I", 0x3001) + b"x", "InvalidResponse"),   # impossible length
    (struct.pack(">I", 10) + b"short", "InvalidResponse"),   # closed early
])
def test_unix_socket_transport_rejects_bad_framing(tmp_path: Path, framed: bytes, code: str) -> None:
    thread = _serve_once(tmp_path / "nsm.sock", lambda _request: framed)
    with pytest.raises(NsmError) as info:
        UnixSocketTransport(tmp_path / "nsm.sock").call(cbor2.dumps("GetRandom"))
    assert info.value.code == code
    thread.join(5)


def test_unix_socket_transport_without_a_service_is_internal_error(tmp_path: Path) -> None:
    with pytest.raises(NsmError) as info:
        UnixSocketTransport(tmp_path / "absent.sock").call(cbor2.dumps("GetRandom"))
    assert info.value.code == "InternalError"
