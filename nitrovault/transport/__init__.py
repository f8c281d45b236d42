"""Sockets, vsock and the bounded relay.

Production code only sees the address types; the :class:`AddressMap` (``DIRECT`` for real ``AF_VSOCK``,
``nitrovault.local.vsock.LocalVsockMap`` locally) is chosen at the composition root.

::

    parse_address("vsock:16:5000") -> VsockAddress(16, 5000)
    await open_connection(address, mapping) -> (StreamReader, StreamWriter)
    await start_server(address, client_connected_cb, mapping) -> Listener(.bound, .close())
    Relay(listen, target, mapping=..., max_connections=256, idle_timeout=300.0,
          buffer_size=65536, connect_timeout=5.0,
          max_connections_per_source=None, connection_rate_per_source=None,
          connection_burst_per_source=None,           # per source: peer IP (IPv6 /64), CID, or unix
          tls_handshake_timeout=None, max_handshake_bytes=65536)   # the TLS record-header guard
        # await .start() / .close(); .bound, .stats (RelayStats: refused_by_reason[Refusal...])
    run_relay(listen, target, ...)                  # blocking, until SIGINT/SIGTERM
"""

from nitrovault.transport.address import (
    DIRECT,
    Address,
    AddressMap,
    DirectMap,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from nitrovault.transport.admission import Refusal, TlsRecordGuard, TokenBucket, source_of
from nitrovault.transport.connect import ConnectForwarder
from nitrovault.transport.relay import Relay, RelayStats, run_relay
from nitrovault.transport.streams import Listener, open_connection, open_socket, start_server

__all__ = [
    "DIRECT",
    "Address",
    "AddressMap",
    "ConnectForwarder",
    "DirectMap",
    "Listener",
    "Refusal",
    "Relay",
    "RelayStats",
    "TcpAddress",
    "TlsRecordGuard",
    "TokenBucket",
    "UnixAddress",
    "VsockAddress",
    "open_connection",
    "open_socket",
    "parse_address",
    "run_relay",
    "source_of",
    "start_server",
]
