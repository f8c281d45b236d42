"""The enclave's connection to the shared state store: Valkey/Redis over TLS, reached through the parent.

Quota windows, privacy-budget spend and extraction refusals live in one store shared by every enclave of
a deployment (:mod:`nitrovault.state.limits`), so neither restarting an enclave nor spreading calls over
a fleet gives a subject more than its limits. The parent relays the bytes and could rewrite them, so:

* **TLS from the enclave to the store, end to end.** The connection is opened to a socket the enclave
  chooses (in production vsock ``(3, ports.state_store)``, where the parent's ``vsock-proxy`` relays to
  the store's one allowlisted endpoint), then TLS runs over it with the store's real host name as SNI,
  its certificate checked against the CA bundle of the measured config and that host name. Nothing
  from the environment or the parent enters the TLS trust decision.
* **Only the enclave can authenticate.** The store user's password is sealed with the model (released
  by KMS only to an attested enclave) and is sent only inside that TLS session (``HELLO ... AUTH``). The
  parent's IAM role has no way in: IAM authentication is not used (the parent holds the role's
  credentials), and the default user is disabled (``docs/deploy.md``).
* **Fail closed.** Any failure to reach the store, or an answer that is not what the scripts return,
  becomes :class:`~nitrovault.errors.StateStoreError`; callers turn it into UNAVAILABLE. There are no
  client-side retries: the limit scripts are not idempotent, so a retried charge could count twice.

The client is :mod:`redis` (redis-py): only its connection class is specialised, to open the socket
through the relay and verify TLS against the real host name (redis-py would take ``host`` for both the
TCP connect and the SNI). Scripts run with ``EVALSHA``, loaded on first use (redis-py's
:class:`~redis.commands.core.Script`).

Example::

    settings = StoreSettings(host="master.limits.abc123.use1.cache.amazonaws.com", ca_bundle=pem,
                             username="nitrovault-enclave", namespace="minilm")
    store = StateStore.connect(settings, password, route=lambda: open_socket(address, mapping, timeout=0.5))
    store.ping()
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry

from nitrovault.errors import ConfigError, StateStoreCredentialError, StateStoreError

__all__ = ["Route", "StateStore", "StoreSettings"]

#: opens a connected stream socket to the store (through the relay); raises ``OSError``
Route = Callable[[], socket.socket]


@dataclass(frozen=True)
class StoreSettings:
    """Where the store is and how to trust it (from the measured config; the password is sealed)."""

    #: the store's host name: SNI and the name its certificate must carry
    host: str
    #: PEM CA certificates trusted for the store's TLS certificate
    ca_bundle: str
    #: the store user (RBAC) the sealed password belongs to
    username: str
    #: keys are ``nv:{<hash of namespace and subject>}:<kind>``: deployments sharing a store keep apart
    namespace: str
    #: seconds to connect, or to wait for an answer, before the store counts as unreachable
    timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.host or any(c in self.host for c in " /:\n\r\t"):
            raise ConfigError("state_store.host must be a bare host name")
        if not self.username or not self.namespace:
            raise ConfigError("state_store.username and state_store.namespace must not be empty")
        if not 0 < self.timeout_s <= 10:
            raise ConfigError("state_store.timeout_ms must be within (0, 10000]")

    def key(self, subject: str, kind: str) -> str:
        """The store key of ``subject``'s ``kind`` state. The subject is hashed (the store never holds
        subject ids) inside a hash tag, so every key of one subject is in one cluster slot and a script
        may touch several of them."""
        digest = hashlib.sha256(f"{self.namespace}\0{subject}".encode()).hexdigest()[:32]
        return f"nv:{{{digest}}}:{kind}"


class _RelayedTlsConnection(SSLConnection):
    """redis-py's TLS connection over a socket from ``route``; SNI and the name check use ``host``."""

    def __init__(self, *, route: Route, **kwargs: Any) -> None:
        self._route = route
        super().__init__(**kwargs)

    def _connect(self) -> ssl.SSLSocket:
        sock = self._route()
        try:
            sock.settimeout(self.socket_timeout)
            wrapped: ssl.SSLSocket = self._wrap_socket_with_ssl(sock)  # type: ignore[no-untyped-call]
            return wrapped
        except BaseException:
            sock.close()
            raise


class StateStore:
    """A connection pool to the store and its registered scripts (thread-safe: redis-py's pool is)."""

    def __init__(self, client: redis.Redis, settings: StoreSettings) -> None:
        self.client = client
        self.settings = settings

    @classmethod
    def connect(cls, settings: StoreSettings, password: str, *, route: Route,
                max_connections: int = 64) -> StateStore:
        """A pool (no connection is made yet: :meth:`ping` makes the first)."""
        pool = redis.ConnectionPool(
            connection_class=_RelayedTlsConnection,
            route=route,
            host=settings.host,
            port=6379,  # not connected to (the route decides where bytes go); redis-py names it in errors
            username=settings.username,
            password=password,
            ssl_ca_data=settings.ca_bundle,
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_min_version=ssl.TLSVersion.TLSv1_2,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
        )
        return cls(redis.Redis(connection_pool=pool), settings)

    def ping(self) -> None:
        """One round trip (connect, TLS, AUTH, PING); :class:`StateStoreError` when any step fails."""
        self.call(lambda: self.client.ping())

    def script(self, source: str) -> Callable[[Sequence[str], Sequence[str | int | float]], Any]:
        """A server-side script, run atomically (``EVALSHA``, loaded on first use)."""
        script = self.client.register_script(source)

        def run(keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
            return self.call(lambda: script(keys=list(keys), args=list(args)))

        return run

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (redis-py calls); every store failure becomes :class:`StateStoreError`."""
        try:
            return fn()
        except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError):
            raise StateStoreCredentialError("the state store refused the sealed credential") from None
        except redis.exceptions.NoPermissionError:
            raise StateStoreCredentialError("the state store user may not run that command") from None
        except redis.ResponseError as err:
            raise StateStoreError(f"the state store refused a command ({type(err).__name__})") from None
        except (redis.RedisError, OSError, ssl.SSLError) as err:
            raise StateStoreError(f"the state store is unreachable ({type(err).__name__})") from None

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()
