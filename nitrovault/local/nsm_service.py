"""The local NSM "device" served on a unix socket, standing in for the hypervisor's ``/dev/nsm``.

The NSM belongs to the enclave: no process outside it may ask for a document (a parent that could would
attest as the enclave, with its own key, and obtain the data key). So the local stack runs this service
as its own process in a fresh network namespace (``unshare --net``), listening on an **abstract** unix
socket (``@name``: abstract sockets are scoped to the network namespace and have no file to reach), and
the parent's launcher starts the enclave inside that namespace (``nsenter --net=/proc/PID/ns/net``), as
``nitro-cli`` starts an enclave with its NSM attached. From the parent's namespace the name does not
exist. The service holds the fake Nitro PKI's signing keys, which only it reads (``HOME/aws/pki``).

``python -m nitrovault.local.nsm_service --pki DIR --pcrs FILE --socket @NAME [--module-id ID]``

The enclave process (which never imports ``nitrovault.local``) reaches it through
``nitrovault.nsm.UnixSocketTransport``: the same CBOR requests the ioctl carries, framed with a 4-byte
big-endian length (hand-written: it is six lines and no library does exactly this). The PCRs are fixed by
whoever starts the service (the local stack: the measurement of the enclave code it is about to run), just
as the hypervisor fixes them, so the enclave cannot choose its own measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socketserver
import struct
import threading
from pathlib import Path
from types import FrameType

from nitrovault.local.nsm import DEFAULT_MODULE_ID, LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import unix_socket_address
from nitrovault.transport.loopback import network_interfaces

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

    def __init__(self, path: Path | str, device: LocalNsmDevice) -> None:
        """``path``: a socket file (made 0600), or ``@name`` for an abstract socket."""
        self.device = device
        address = unix_socket_address(str(path))
        self.abstract = address.startswith("\0")
        if not self.abstract:
            with contextlib.suppress(FileNotFoundError):
                Path(address).unlink()
        super().__init__(address, _Handler)
        if not self.abstract:
            os.chmod(address, 0o600)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="local-nsm", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if not self.abstract:
            with contextlib.suppress(FileNotFoundError):
                Path(self.server_address).unlink()  # type: ignore[arg-type]


def load_pcrs(path: Path) -> dict[int, bytes]:
    """``{"0": "hex", ...}`` (what the stack measured) as PCR index -> value."""
    return {int(k): bytes.fromhex(v) for k, v in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nitrovault.local.nsm_service")
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--pcrs", required=True, type=Path)
    parser.add_argument("--socket", required=True, help="@NAME (abstract, preferred) or a socket path")
    parser.add_argument("--module-id", default=DEFAULT_MODULE_ID)
    args = parser.parse_args(argv)
    device = LocalNsmDevice(LocalPki.ensure(args.pki), pcrs=load_pcrs(args.pcrs), module_id=args.module_id)
    server = NsmSocketServer(args.socket, device)
    stopped = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.start()
    interfaces = network_interfaces()
    namespace = "own network namespace" if interfaces == ["lo"] else "shared network namespace"
    print(f"nsm listening on {args.socket} ({namespace}, pid {os.getpid()})", flush=True)
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
