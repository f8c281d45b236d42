"""Real ``AF_VSOCK`` through the production map (``DIRECT``): needs a host where vsock can bind.

Opt-in: ``NITROVAULT_E2E_ENCLAVE=1 pytest -m enclave tests/e2e/test_vsock.py`` on a Nitro parent or in
an enclave (or any Linux with the ``vsock_loopback`` module). The peer CID defaults to 1
(``VMADDR_CID_LOCAL``, loopback); set ``NITROVAULT_E2E_VSOCK_CID`` to dial another one, and
``NITROVAULT_E2E_VSOCK_PORT`` to pick the port (default 52000).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import pytest

from nitrovault.transport import DIRECT, Relay, UnixAddress, VsockAddress, open_connection, start_server
from nitrovault.transport.vsock import CID_ANY

pytestmark = [
    pytest.mark.enclave,
    pytest.mark.skipif(os.environ.get("NITROVAULT_E2E_ENCLAVE") != "1",
                       reason="needs real AF_VSOCK (set NITROVAULT_E2E_ENCLAVE=1)"),
]

PEER_CID = int(os.environ.get("NITROVAULT_E2E_VSOCK_CID", "1"))
PORT = int(os.environ.get("NITROVAULT_E2E_VSOCK_PORT", "52000"))


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()


def test_vsock_echo_through_relay() -> None:
    d = tempfile.mkdtemp(dir="/tmp", prefix="nve")

    async def main() -> None:
        echo = await start_server(UnixAddress(f"{d}/echo.sock"), _echo)
        relay = Relay(VsockAddress(CID_ANY, PORT), UnixAddress(f"{d}/echo.sock"), mapping=DIRECT)
        await relay.start()
        try:
            assert isinstance(relay.bound, VsockAddress) and relay.bound.port == PORT
            r, w = await open_connection(VsockAddress(PEER_CID, PORT), DIRECT)
            payload = os.urandom(1 << 20)
            w.write(payload)
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 30) == payload
            w.close()
        finally:
            await relay.close()
            await echo.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        shutil.rmtree(d, ignore_errors=True)
