"""Clients of the test suite's real redis-server (the ``state_store_server`` fixture in ``conftest.py``)."""

from __future__ import annotations

from typing import Any


def store_for(server: Any, port: int, *, password: str | None = None, ca: bytes | None = None,
              host: str | None = None, namespace: str | None = None) -> Any:
    """A :class:`~nitrovault.state.StateStore` client of the test server (a fresh namespace by default, so
    tests never see each other's subjects)."""
    import socket
    import uuid

    from nitrovault.local.state_store import HOST, USERNAME
    from nitrovault.state import StateStore, StoreSettings

    settings = StoreSettings(host=host or HOST, ca_bundle=(ca or server.ca_pem).decode(), username=USERNAME,
                             namespace=namespace or uuid.uuid4().hex, timeout_s=2.0)
    return StateStore.connect(settings, server.password if password is None else password,
                              route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))

