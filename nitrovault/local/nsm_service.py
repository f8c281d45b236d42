"""The local NSM "device" served on a unix socket, standing in for the hypervisor's ``/dev/nsm``.

The enclave process (which never imports ``nitrovault.local``) reaches it through
``nitrovault.nsm.UnixSocketTransport``: the same CBOR requests the ioctl carries, framed with a 4-byte
big-endian length (hand-written: it is six lines and no library does exactly this). The PCRs are fixed by
whoever starts the service (the local stack: the measurement of the enclave code it is about to run), just
as the hypervisor fixes them, so the enclave cannot choose its own measurements.
"""

from __future__ import annotations

import contextlib
import os
import socketserver
import struct
import threading
from pathlib import Path

from nitrovault.local.nsm import LocalNsmDevice

MAX_REQUEST = 0x1000


class _Handler(socketserver.StreamRequestHandler):
    server: NsmSocketServer

    def handle(self) -> None:
        header = self.rfile.read(4)
        if len(header) != 4:
            return
        (length,) = struct.unpack(">I", header)
        if length > MAX_REQUEST:
            response = b"\xa1\x65Error\x6dInputTooLarge"  # {"Error": "InputTooLarge"}
        else:
            request = self.rfile.read(length)
            if len(request) != length:
                return
            response = self.server.device.call(request)
        self.wfile.write(struct.pack(">I", len(response)) + response)


class NsmSocketServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, device: LocalNsmDevice) -> None:
        self.device = device
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="local-nsm", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            Path(self.server_address).unlink()  # type: ignore[arg-type]
