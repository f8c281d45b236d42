"""The transcript a server stream's receipt covers (``Generate``: one receipt, in the last message).

A unary call's receipt hashes the response message serialized deterministically with ``receipt`` unset.
A stream's receipt hashes its *transcript* instead: every message of the stream serialized
deterministically, each preceded by its length as a varint (protobuf's length-delimited stream format,
what ``writeDelimitedTo`` writes), the last one with ``receipt`` unset. So the receipt fixes the order,
the boundaries and the content of every message; a piece dropped, added, reordered or re-split changes
the hash. The enclave and the client build it with the same :class:`Transcript`.

Written here rather than taken from protobuf: the Python runtime keeps its varint encoder private
(``google.protobuf.internal``), and the encoding is four lines.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Transcript", "varint"]


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError("a varint length is never negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Transcript:
    """The length-delimited bytes of a stream's messages, in order (module docstring)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.messages = 0

    def add(self, message: Any) -> None:
        """Append ``message`` (a protobuf message) as it was, or will be, sent."""
        self._append(message.SerializeToString(deterministic=True))

    def add_last(self, message: Any) -> None:
        """Append the stream's last message with its ``receipt`` field unset (what the receipt covers)."""
        unsigned = type(message)()
        unsigned.CopyFrom(message)
        unsigned.ClearField("receipt")
        self._append(unsigned.SerializeToString(deterministic=True))

    def _append(self, data: bytes) -> None:
        self._data += varint(len(data))
        self._data += data
        self.messages += 1

    def __bytes__(self) -> bytes:
        return bytes(self._data)
