"""asyncio streams over any :data:`Address`: unix, tcp and vsock (the I/O shell of the transport).

``open_connection`` and ``start_server`` first ask the :class:`AddressMap` how to reach the address
(production: :data:`DIRECT`, real ``AF_VSOCK``; locally: ``LocalVsockMap``, a unix socket), then use
asyncio's own helpers. Vsock sockets are made in :mod:`nitrovault.transport.vsock` and passed with
``sock=`` because asyncio has no vsock support.

Invariants for unix listeners:

* A stale socket file (nobody listening) is removed before binding; a live one is never stolen
  (``OSError(EADDRINUSE)``), and a path that is not a socket is never removed (:class:`ConfigError`).
* The socket file gets ``unix_mode`` (default ``0o600``) *between* ``bind()`` and ``listen()``, so no
  peer can connect while the file still has umask permissions.
* :meth:`Listener.close` removes the socket file, but only if it is still the one this listener bound.

Example::

    async def main() -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(100)); await w.drain(); w.close()
        listener = await start_server(UnixAddress("/tmp/echo.sock"), echo)
        reader, writer = await open_connection(listener.bound)
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nitrovault.errors import ConfigError
from nitrovault.transport.address import DIRECT, Address, AddressMap, TcpAddress, UnixAddress, VsockAddress
from nitrovault.transport.vsock import bind_vsock, connect_vsock

#: Default per-stream read buffer limit (asyncio pauses reading beyond about twice this).
DEFAULT_LIMIT = 64 * 1024

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def open_connection(
    address: Address, mapping: AddressMap = DIRECT, *, limit: int = DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``address`` (as resolved by ``mapping``). Raises ``OSError`` when unreachable."""
    target = mapping.resolve(address)
    if isinstance(target, UnixAddress):
        return await asyncio.open_unix_connection(target.path, limit=limit)
    if isinstance(target, TcpAddress):
        return await asyncio.open_connection(target.host, target.port, limit=limit)
    sock = await connect_vsock(target)
    try:
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


def open_socket(address: Address, mapping: AddressMap = DIRECT, *, timeout: float) -> socket.socket:
    """A connected blocking socket to ``address`` (as resolved by ``mapping``) with ``timeout`` for the
    connect and every later operation: for synchronous clients (the state store's redis-py pool).
    Raises ``OSError`` when unreachable; the socket is closed on any failure."""
    target = mapping.resolve(address)
    if isinstance(target, TcpAddress):
        return socket.create_connection((target.host, target.port), timeout=timeout)
    if isinstance(target, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where: object = target.path
    else:
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise ConfigError("this platform has no AF_VSOCK; use a local address map (--run-dir)")
        sock = socket.socket(family, socket.SOCK_STREAM)
        where = (target.cid, target.port)
    try:
        sock.settimeout(timeout)
        sock.connect(where)  # type: ignore[arg-type]
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Listener:
    """A listening server: ``address`` as asked for, ``bound`` as actually bound (tcp port filled in)."""

    server: asyncio.Server
    address: Address
    bound: Address
    _unix_identity: tuple[int, int] | None = None

    def stop_accepting(self) -> None:
        """Stop accepting new connections now (idempotent)."""
        self.server.close()

    async def close(self) -> None:
        """Stop accepting and remove this listener's unix socket file.

        Since Python 3.12 ``Server.wait_closed`` also waits for open connections, so close those first.
        """
        self.server.close()
        await self.server.wait_closed()
        if isinstance(self.bound, UnixAddress) and self._unix_identity is not None:
            try:
                st = os.lstat(self.bound.path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == self._unix_identity:
                os.unlink(self.bound.path)


def _remove_stale_unix_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a unix socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a unix connect() answers at once; the timeout only bounds a wedged peer
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover from a process that died
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")


def _bind_unix(path: str, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen(): nobody can connect yet
        st = os.lstat(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


async def start_server(
    address: Address,
    client_connected_cb: ClientConnected,
    mapping: AddressMap = DIRECT,
    *,
    limit: int = DEFAULT_LIMIT,
    unix_mode: int = 0o600,
    backlog: int = 128,
) -> Listener:
    """Listen on ``address`` (as resolved by ``mapping``); ``client_connected_cb`` runs per connection."""
    target = mapping.resolve(address)
    if isinstance(target, UnixAddress):
        sock, identity = _bind_unix(target.path, unix_mode)
        try:
            server = await asyncio.start_unix_server(
                client_connected_cb, sock=sock, limit=limit, backlog=backlog
            )
        except BaseException:
            sock.close()
            raise
        return Listener(server, address, target, identity)
    if isinstance(target, TcpAddress):
        server = await asyncio.start_server(
            client_connected_cb, target.host, target.port, limit=limit, backlog=backlog
        )
        port = server.sockets[0].getsockname()[1]
        return Listener(server, address, TcpAddress(target.host, port))
    vsock = bind_vsock(target)
    try:
        server = await asyncio.start_server(client_connected_cb, sock=vsock, limit=limit, backlog=backlog)
    except BaseException:
        vsock.close()
        raise
    cid, port = vsock.getsockname()
    return Listener(server, address, VsockAddress(cid, port))
