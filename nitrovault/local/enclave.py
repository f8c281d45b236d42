"""Local composition root of the enclave: the same ``enclave_app.main.run`` as production, with the local
address map (vsock over unix sockets) and the local NSM service instead of ``/dev/nsm``.

Started by the parent's supervisor, normally under ``unshare --net`` so that the process has no network
but a loopback (brought up here, as the enclave's init does); its only ways out are the unix sockets of the
vsock stand-in, exactly as an enclave's only way out is vsock.

``python -m nitrovault.local.enclave --config FILE --nsm-socket PATH --vsock-dir DIR --run-dir DIR``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

from enclave_app.config import EnclaveConfig
from enclave_app.main import run
from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.nsm import UnixSocketTransport


def network_interfaces() -> list[str]:
    """Interfaces of *this process's* network namespace (``/sys/class/net`` shows the mount's, not ours)."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def isolate_loopback() -> str:
    """Bring ``lo`` up when this process sits alone in a network namespace; say what isolation we have."""
    interfaces = network_interfaces()
    if interfaces != ["lo"]:
        return f"not isolated (interfaces: {', '.join(interfaces) or 'unknown'})"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False, capture_output=True, timeout=5)
    return "own network namespace, loopback only"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nitrovault.local.enclave")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--nsm-socket", required=True)
    parser.add_argument("--vsock-dir", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    isolation = isolate_loopback()
    print(f'{{"event": "isolation", "detail": "{isolation}"}}', flush=True)
    try:
        config = EnclaveConfig.load(args.config)
    except ConfigError as err:
        print(err.diagnostics(), file=sys.stderr)
        return 2
    return asyncio.run(
        run(
            config,
            mapping=LocalVsockMap(args.vsock_dir),
            nsm_transport=UnixSocketTransport(args.nsm_socket),
            run_dir=args.run_dir,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
