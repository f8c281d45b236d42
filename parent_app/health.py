"""The parent's HTTP health endpoint for the load balancer (which cannot look inside the enclave's TLS).

``GET /health`` answers ``200`` with the body ``SERVING`` only while ``state()`` (the parent's view of
the enclave, ``HostServices.status.state``) is ``"SERVING"``, and ``503`` with the state's name
otherwise; anything else (another method, path or protocol, or no request line at all) gets ``404``.
Standard library only.

Invariants:

* **Nothing but the state name leaves.** The body is ``SERVING`` or the state's name (upper-case
  letters and ``_``, at most 32, else ``UNKNOWN``); never the status reason, a path or request bytes.
  Nothing about a request is logged.
* **Bounded.** A request head (request line and headers) may be at most ``max_request_bytes`` and must
  arrive within ``timeout`` seconds, else the connection is closed without an answer; at most
  ``max_connections`` requests are served at once, more are closed at once. Every answer carries
  ``Connection: close`` and the connection is closed after it.
* **Clean shutdown.** :meth:`HealthEndpoint.close` stops accepting and ends every open connection.

Example::

    health = HealthEndpoint(TcpAddress("0.0.0.0", 8080), lambda: host.status.state)
    await health.start()
    ...   # curl -i http://HOST:8080/health  ->  HTTP/1.1 200 OK ... SERVING
    await health.close()
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from nitrovault.errors import ConfigError
from nitrovault.transport import Listener, TcpAddress, start_server

log = logging.getLogger(__name__)

PATH = "/health"
SERVING = "SERVING"
_STATE_NAME = re.compile(r"[A-Z_]{1,32}")
_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def answer(request_head: bytes, state: str) -> tuple[int, str]:
    """The status code and body for a request head (pure).

    >>> answer(b"GET /health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n", "SERVING")
    (200, 'SERVING')
    >>> answer(b"GET /health HTTP/1.1\\r\\n\\r\\n", "RESTARTING")
    (503, 'RESTARTING')
    >>> answer(b"POST /health HTTP/1.1\\r\\n\\r\\n", "SERVING")
    (404, 'not found')
    """
    line, _, _ = request_head.partition(b"\r\n")
    parts = line.split(b" ")
    wanted = len(parts) == 3 and parts[0] == b"GET" and parts[1] == PATH.encode()
    if not wanted or not parts[2].startswith(b"HTTP/1."):
        return 404, "not found"
    if state == SERVING:
        return 200, SERVING
    return 503, state if _STATE_NAME.fullmatch(state) else "UNKNOWN"


def _response(code: int, body: str) -> bytes:
    data = body.encode("ascii") + b"\n"
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + data


class HealthEndpoint:
    """Serve ``GET /health`` on ``listen`` from ``state()``; see the module docstring."""

    def __init__(
        self,
        listen: TcpAddress,
        state: Callable[[], str],
        *,
        timeout: float = 5.0,
        max_request_bytes: int = 4096,
        max_connections: int = 64,
    ) -> None:
        if not timeout > 0 or max_request_bytes < 64 or max_connections < 1:
            raise ConfigError("health endpoint limits must be positive (max_request_bytes at least 64)")
        self.listen = listen
        self._state = state
        self._timeout = timeout
        self._max_bytes = max_request_bytes
        self._max_connections = max_connections
        self._listener: Listener | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Bind and serve. Raises ``OSError`` if the address cannot be bound."""
        if self._listener is not None:
            raise RuntimeError("health endpoint already started")
        self._listener = await start_server(self.listen, self._on_client, limit=self._max_bytes)
        log.info("health endpoint listening on %s (GET %s)", self._listener.bound, PATH)

    @property
    def bound(self) -> TcpAddress:
        """The address actually bound (a port 0 is filled in)."""
        if self._listener is None or not isinstance(self._listener.bound, TcpAddress):
            raise RuntimeError("health endpoint not started")
        return self._listener.bound

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.stop_accepting()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None or len(self._tasks) >= self._max_connections:
            writer.transport.abort()
            return
        self._tasks.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
            writer.write(_response(*answer(head, self._state())))
            writer.close()  # after the answer is flushed
            await asyncio.wait_for(writer.wait_closed(), self._timeout)
        except asyncio.CancelledError:
            writer.transport.abort()
            if not self._closing:
                raise
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.transport.abort()  # too slow, too big, or gone: no answer
        finally:
            self._tasks.discard(task)
