"""``python -m nitrovault.transport LISTEN TARGET`` runs a relay until SIGINT/SIGTERM (production map).

Vsock addresses are real ``AF_VSOCK`` here. The local stand-in (vsock as unix sockets under a run
directory) is chosen only at a composition root that may import ``nitrovault.local``:
``python -m nitrovault.local.vsock LISTEN TARGET --run-dir DIR`` runs this same entry with that map.

Once listening it prints ``listening on ADDRESS`` on stdout, so a parent process can wait for that
line. Exit codes: 0 clean stop, 2 bad arguments or cannot bind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from nitrovault.errors import ConfigError
from nitrovault.transport.address import DIRECT, Address, AddressMap, parse_address
from nitrovault.transport.relay import run_relay


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "python -m nitrovault.transport",
    local_map: Callable[[str], AddressMap] | None = None,
) -> int:
    """Parse arguments and run the relay. With ``local_map``, ``--run-dir DIR`` is required and the
    address map is ``local_map(DIR)``; without it, the production map."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a bounded relay LISTEN -> TARGET until SIGINT or SIGTERM."
    )
    parser.add_argument("listen", help="vsock:CID:PORT | unix:PATH | tcp:HOST:PORT")
    parser.add_argument("target", help="vsock:CID:PORT | unix:PATH | tcp:HOST:PORT")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds")
    if local_map is not None:
        parser.add_argument(
            "--run-dir", required=True, help="map vsock (cid, port) to DIR/vsock/<cid>_<port>.sock"
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    def ready(bound: Address) -> None:
        print(f"listening on {bound}", flush=True)

    try:
        mapping: AddressMap = DIRECT if local_map is None else local_map(args.run_dir)
        run_relay(
            parse_address(args.listen),
            parse_address(args.target),
            mapping=mapping,
            on_ready=ready,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            connect_timeout=args.connect_timeout,
        )
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
