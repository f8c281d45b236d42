"""The local vsock stand-in: a ``(cid, port)`` is a unix socket ``RUN_DIR/vsock/<cid>_<port>.sock``.

Production code only sees :class:`~nitrovault.transport.address.VsockAddress`; a composition root that
runs the local stack passes ``LocalVsockMap(run_dir)`` as the address map instead of the production
``DIRECT``. The enclave process (in its own network namespace) and the parent process share the run
directory, which is the only channel between them, just as vsock is in production.

``python -m nitrovault.local.vsock LISTEN TARGET --run-dir DIR`` runs the transport relay with this map
(the production entry, ``python -m nitrovault.transport``, cannot import the stand-ins).

Invariants: the mapping is pure and total on vsock addresses (unix and tcp addresses pass through);
the ``vsock`` folder is created ``0700`` so only this user can reach the sockets; every mapped path
fits a unix socket path (107 bytes) or construction fails with :class:`ConfigError`.

Example::

    >>> m = LocalVsockMap("/tmp/nv")
    >>> m.resolve(VsockAddress(16, 5000))
    UnixAddress(path='/tmp/nv/vsock/16_5000.sock')
"""

from __future__ import annotations

import os
from pathlib import Path

from nitrovault.errors import ConfigError
from nitrovault.transport.address import UNIX_PATH_MAX, VSOCK_MAX, Address, UnixAddress, VsockAddress


class LocalVsockMap:
    """Maps :class:`VsockAddress` to a unix socket under ``run_dir/vsock``; other addresses pass through."""

    def __init__(self, run_dir: str | os.PathLike[str], *, create: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "vsock"
        # The longest mapped path must still fit sun_path: fail at construction, not at first connect.
        longest = str(self.directory / f"{VSOCK_MAX}_{VSOCK_MAX}.sock")
        if len(longest.encode()) > UNIX_PATH_MAX:
            raise ConfigError(
                f"run directory {str(self.run_dir)!r} is too long for unix socket paths; use a shorter one"
            )
        if create:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_for(self, address: VsockAddress) -> str:
        return str(self.directory / f"{address.cid}_{address.port}.sock")

    def resolve(self, address: Address) -> Address:
        if isinstance(address, VsockAddress):
            return UnixAddress(self.path_for(address))
        return address

    def __repr__(self) -> str:
        return f"LocalVsockMap({str(self.run_dir)!r})"


def main(argv: list[str] | None = None) -> int:
    """``python -m nitrovault.local.vsock LISTEN TARGET --run-dir DIR``: the relay over the local map."""
    from nitrovault.transport.__main__ import main as relay_main

    return relay_main(argv, prog="python -m nitrovault.local.vsock", local_map=LocalVsockMap)


if __name__ == "__main__":
    raise SystemExit(main())
