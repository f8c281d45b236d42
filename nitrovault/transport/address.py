"""Socket addresses as values: ``vsock:CID:PORT``, ``unix:/path``, ``tcp:HOST:PORT`` (pure, no I/O).

Invariants:

* An address object is always valid: the constructors check ranges (vsock CID and port are 32-bit,
  TCP ports 16-bit, unix paths at most 107 bytes without NUL) and raise :class:`ConfigError` otherwise.
* ``parse_address(str(a)) == a`` for every address ``a`` (``str()`` round-trips).
* Production code only ever sees these types. *How* a :class:`VsockAddress` is reached is decided by
  an :class:`AddressMap` chosen at the composition root: :data:`DIRECT` (real ``AF_VSOCK``) in
  production, ``nitrovault.local.vsock.LocalVsockMap`` (a unix socket per ``(cid, port)``) locally.

Example::

    >>> a = parse_address("vsock:16:5000")
    >>> a
    VsockAddress(cid=16, port=5000)
    >>> str(a)
    'vsock:16:5000'
    >>> DIRECT.resolve(a) is a
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

from nitrovault.errors import ConfigError

#: Largest vsock CID / port (``VMADDR_CID_ANY`` / ``VMADDR_PORT_ANY`` are this value).
VSOCK_MAX = 0xFFFF_FFFF
#: ``sizeof(sockaddr_un.sun_path) - 1`` on Linux: the longest path a unix socket can bind.
UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class VsockAddress:
    """An ``AF_VSOCK`` endpoint. The parent instance is CID 3, an enclave usually CID 16."""

    cid: int  #: context id, 0..2**32-1
    port: int  #: vsock port, 0..2**32-1 (32-bit, unlike TCP)

    def __post_init__(self) -> None:
        for name, value in (("cid", self.cid), ("port", self.port)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= VSOCK_MAX:
                raise ConfigError(f"vsock {name} must be an integer in 0..{VSOCK_MAX}, got {value!r}")

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    """A unix stream socket bound to a filesystem path (abstract sockets are not supported)."""

    path: str  #: absolute or relative path, at most 107 bytes once UTF-8 encoded

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("unix socket path must be a non-empty string")
        if "\x00" in self.path:
            raise ConfigError("unix socket path must not contain NUL")
        if len(self.path.encode()) > UNIX_PATH_MAX:
            raise ConfigError(
                f"unix socket path is {len(self.path.encode())} bytes; the limit is {UNIX_PATH_MAX}"
            )

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    """A TCP endpoint. ``host`` is a name or an IP literal (IPv6 without brackets)."""

    host: str  #: host name or IP literal, e.g. ``127.0.0.1`` or ``::1``
    port: int  #: 0..65535; 0 asks the OS for a free port when listening

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host or any(c in self.host for c in "[] \x00/"):
            raise ConfigError(f"tcp host must be a host name or IP literal, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 0xFFFF:
            raise ConfigError(f"tcp port must be an integer in 0..65535, got {self.port!r}")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


Address: TypeAlias = VsockAddress | UnixAddress | TcpAddress


def _parse_int(text: str, what: str, spec: str) -> int:
    # int() would accept "+5", " 5" and "5_000"; an address is plain decimal digits only.
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"bad {what} in address {spec!r}: expected decimal digits")
    return int(text)


def parse_address(spec: str) -> Address:
    """Parse ``vsock:CID:PORT``, ``unix:PATH`` or ``tcp:HOST:PORT`` (``tcp:[::1]:80`` for IPv6).

    Raises :class:`ConfigError` on anything else, naming what was wrong.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"address must be a string, got {type(spec).__name__}")
    scheme, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(f"address {spec!r} has no scheme; expected vsock:, unix: or tcp:")
    if scheme == "unix":
        return UnixAddress(rest)
    if scheme == "vsock":
        cid, sep, port = rest.partition(":")
        if not sep:
            raise ConfigError(f"vsock address {spec!r} must be vsock:CID:PORT")
        return VsockAddress(_parse_int(cid, "cid", spec), _parse_int(port, "port", spec))
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ConfigError(f"tcp address {spec!r} must be tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"IPv6 host in {spec!r} must be in brackets: tcp:[::1]:PORT")
        return TcpAddress(host, _parse_int(port, "port", spec))
    raise ConfigError(f"unknown address scheme {scheme!r} in {spec!r}; expected vsock:, unix: or tcp:")


class AddressMap(Protocol):
    """Decides how an address is reached. ``resolve`` returns the address to actually dial or bind.

    The production map returns its argument unchanged (vsock via real ``AF_VSOCK``); the local map
    turns a :class:`VsockAddress` into a :class:`UnixAddress`. Implementations must be pure.
    """

    def resolve(self, address: Address) -> Address: ...


@dataclass(frozen=True)
class DirectMap:
    """The production map: every address is used as written (vsock means a real ``AF_VSOCK`` socket)."""

    def resolve(self, address: Address) -> Address:
        return address


#: The production address map.
DIRECT = DirectMap()
