"""Local composition root of the parent: ``parent_app.main.run`` with vsock over unix sockets.

``python -m nitrovault.local.parent CONFIG --vsock-dir DIR``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from parent_app.config import ParentConfig
from parent_app.main import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nitrovault.local.parent")
    parser.add_argument("config")
    parser.add_argument("--vsock-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        config = ParentConfig.load(args.config)
        return asyncio.run(run(config, mapping=LocalVsockMap(args.vsock_dir)))
    except ConfigError as err:
        print(err.diagnostics(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
