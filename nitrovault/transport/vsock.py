"""Real ``AF_VSOCK`` sockets (production; Linux only).

PyPI's grpcio is built without vsock support, and asyncio has no vsock helpers, so the streams layer
(:mod:`nitrovault.transport.streams`) creates these sockets here and hands them to
``asyncio.open_connection(sock=...)`` / ``asyncio.start_server(sock=...)``.

Invariants: every socket returned is non-blocking and ``SOCK_STREAM``; on any failure the socket is
closed before the exception (an ``OSError``) propagates. The build and CI machines can create
``AF_VSOCK`` sockets but ``bind()`` fails with ``EPERM`` there, so these helpers are only exercised by
the opt-in ``enclave`` end-to-end tests; everything else goes through ``LocalVsockMap``.
"""

from __future__ import annotations

import asyncio
import socket

from nitrovault.errors import ConfigError
from nitrovault.transport.address import VsockAddress

#: ``VMADDR_CID_ANY``: bind on every CID of this instance.
CID_ANY = 0xFFFF_FFFF
#: The parent instance's CID as seen from an enclave.
PARENT_CID = 3


def _new_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise ConfigError("this platform has no AF_VSOCK; use a local address map (--run-dir)")
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def connect_vsock(address: VsockAddress) -> socket.socket:
    """A connected, non-blocking ``AF_VSOCK`` socket to ``address``."""
    sock = _new_socket()
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_vsock(address: VsockAddress) -> socket.socket:
    """A bound (not yet listening), non-blocking ``AF_VSOCK`` socket; asyncio calls ``listen()``."""
    sock = _new_socket()
    try:
        sock.bind((address.cid, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


#: ``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` (``_IO(7, 0xb9)``, linux/vm_sockets.h)
_GET_LOCAL_CID = 0x7B9


def local_cid(device: str = "/dev/vsock") -> int | None:
    """This machine's vsock CID (an enclave's own CID, 3 on a parent), or ``None`` where there is none.

    The kernel's answer to ``IOCTL_VM_SOCKETS_GET_LOCAL_CID`` on ``/dev/vsock``: an enclave started with
    ``nitro-cli run-enclave --enclave-cid N`` reads ``N``, so one measured image serves under any CID."""
    import fcntl
    import struct

    try:
        with open(device, "rb") as dev:
            raw = fcntl.ioctl(dev, _GET_LOCAL_CID, struct.pack("I", 0))
    except OSError:
        return None
    cid: int = struct.unpack("I", raw)[0]
    return cid if 0 < cid < CID_ANY else None
