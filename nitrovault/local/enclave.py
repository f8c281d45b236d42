"""Local composition root of the enclave: the same ``enclave_app.main.run`` as production, with the local
address map (vsock over unix sockets) and the local NSM service instead of ``/dev/nsm``.

Started by the parent's supervisor, normally inside the network namespace of the local NSM service
(``nsenter --net=/proc/PID/ns/net``, see :mod:`nitrovault.local.nsm_service`): a namespace with nothing
but a loopback interface that is down, as in a freshly started enclave. Nothing here touches it: the
enclave app itself brings ``lo`` up for its KMS forwarder, exactly as in production. Its only ways out
are the unix sockets of the vsock stand-in, exactly as an enclave's only way out is vsock, and its NSM
is the abstract socket only that namespace can reach.

``python -m nitrovault.local.enclave --config FILE --nsm-socket @NAME --vsock-dir DIR --run-dir DIR``
``[--cid N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from enclave_app.config import EnclaveConfig
from enclave_app.main import run
from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.nsm import UnixSocketTransport
from nitrovault.transport.loopback import network_interfaces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nitrovault.local.enclave")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--nsm-socket", required=True)
    parser.add_argument("--vsock-dir", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--cid", type=int, default=None,
                        help="this enclave's vsock CID (the parent starts several with their own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    interfaces = network_interfaces()
    isolation = ("own network namespace, loopback only" if interfaces == ["lo"]
                 else f"not isolated (interfaces: {', '.join(interfaces) or 'unknown'})")
    print(json.dumps({"event": "isolation", "detail": isolation}), flush=True)
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
            enclave_cid=args.cid,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
