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
TCP connect and the SNI). Scripts run with ``EVALSHA`` (loaded once, and again after a NOSCRIPT), in
pipelined batches when calls overlap (group commit: a lone call goes out at once; concurrent ones share a
write and a read), which keeps the store's cost per call low when many requests are in flight
(``bench/bench_shared_limits.py``).

Example::

    settings = StoreSettings(host="master.limits.abc123.use1.cache.amazonaws.com", ca_bundle=pem,
                             username="nitrovault-enclave", namespace="minilm")
    store = StateStore.connect(settings, password, route=lambda: open_socket(address, mapping, timeout=0.5))
    store.ping()
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection
from redis.retry import Retry

from nitrovault.errors import ConfigError, StateStoreCredentialError, StateStoreError

__all__ = ["HOST_NAME", "Route", "StateStore", "StoreSettings"]

#: opens a connected stream socket to the store (through the relay); raises ``OSError``
Route = Callable[[], socket.socket]
#: a DNS host name as ElastiCache names its endpoints: lower-case labels of letters, digits and inner
#: hyphens, dot-separated (no port, scheme, user, path or whitespace)
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}")


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
        if not HOST_NAME.fullmatch(self.host):
            raise ConfigError("state_store.host must be a bare host name (lower-case DNS labels, no port)")
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
        """A server-side script, run atomically (``EVALSHA``; loaded once, again after a NOSCRIPT)."""

        def run(keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
            return self._batcher.run(source, keys, args)

        return run

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (redis-py calls); every store failure becomes :class:`StateStoreError`."""
        try:
            return fn()
        except Exception as err:
            raise translate(err) from None

    def close(self) -> None:
        self._batcher.close()
        self.client.close()
        self.client.connection_pool.disconnect()

    @property
    def _batcher(self) -> _Batcher:
        batcher = self.__dict__.get("_batcher_instance")
        if batcher is None:
            with _BATCHER_LOCK:
                batcher = self.__dict__.setdefault("_batcher_instance", _Batcher(self))
        return batcher  # type: ignore[no-any-return]


def translate(err: Exception) -> StateStoreError:
    """A redis-py or socket failure as the :class:`StateStoreError` it means (messages name no secret)."""
    if isinstance(err, StateStoreError):
        return err
    if isinstance(err, redis.AuthenticationError | redis.exceptions.AuthenticationWrongNumberOfArgsError):
        return StateStoreCredentialError("the state store refused the sealed credential")
    if isinstance(err, redis.exceptions.NoPermissionError):
        return StateStoreCredentialError("the state store user may not run that command")
    if isinstance(err, redis.ResponseError):
        return StateStoreError(f"the state store refused a command ({type(err).__name__})")
    if isinstance(err, redis.RedisError | OSError | ssl.SSLError):
        return StateStoreError(f"the state store is unreachable ({type(err).__name__})")
    raise err


_BATCHER_LOCK = threading.Lock()


class _Call:
    """One script call waiting for its batch: its answer, or the failure, and the caller's wake-up."""

    __slots__ = ("args", "error", "finished", "keys", "led", "result", "source", "wake")

    def __init__(self, source: str, keys: Sequence[str], args: Sequence[str | int | float]) -> None:
        self.source, self.keys, self.args = source, keys, args
        self.result: Any = None
        self.error: StateStoreError | None = None
        self.finished = False
        self.led = False  #: handed the lead (under the batcher's lock) while still queued
        self.wake = threading.Event()


class _Batcher:
    """Script calls from any number of threads, sent in pipelined batches by whichever caller leads (group
    commit): a caller that finds nobody sending sends its own call at once, so a lone call costs one round
    trip and no thread hand-off; calls that arrive meanwhile queue, and the leader's successor (the first
    of them, woken when the leader's batch is answered) sends them all in one write and one read. There is
    at most one leader; the lead passes from caller to caller, also when a waiting caller gives up. Each
    call is still its own atomic script; a batch is not a transaction. A queued call not sent within
    ``2 * timeout_s`` is withdrawn and its caller gets :class:`StateStoreError`; a sent one waits for its
    batch, which the socket timeouts bound."""

    def __init__(self, store: StateStore, max_batch: int = 64) -> None:
        self._store = store
        self._max = max_batch
        self._wait_s = 2 * store.settings.timeout_s
        self._queue: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._leading = False
        self._closed = False
        self._shas: dict[str, str] = {}

    def run(self, source: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        call = _Call(source, keys, args)
        with self._lock:
            if self._closed:
                raise StateStoreError("the state store client is closed")
            self._queue.append(call)
            lead = not self._leading
            self._leading = True
        while not call.finished:
            if lead:
                self._lead()  # its first call is this one: the lead only ever goes to the queue's head
                lead = False
                continue
            if not call.wake.wait(self._wait_s):
                with self._lock:
                    if call in self._queue:  # never sent: withdraw it (and pass on a lead it was handed)
                        self._queue.remove(call)
                        if call.led:
                            self._pass_lead()
                        raise StateStoreError("the state store is unreachable (no answer in time)")
                continue  # sent: its batch answers it
            call.wake.clear()
            with self._lock:
                lead, call.led = call.led and not call.finished, False
        if call.error is not None:
            raise call.error
        return call.result

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _lead(self) -> None:
        """Send one batch from the head of the queue, answer its callers, hand the lead to the next."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._max, len(self._queue)))]
        self._execute(batch, reload_once=True)
        for call in batch:
            call.finished = True
            call.wake.set()
        with self._lock:
            self._pass_lead()

    def _pass_lead(self) -> None:
        """(Under the lock.) The queue's head leads next; nobody leads when the queue is empty."""
        if self._queue:
            head = self._queue[0]
            head.led = True
            head.wake.set()
        else:
            self._leading = False

    def _execute(self, batch: list[_Call], *, reload_once: bool) -> None:
        client = self._store.client
        try:
            for source in {call.source for call in batch} - set(self._shas):
                self._shas[source] = client.script_load(source)
            pipe = client.pipeline(transaction=False)
            for call in batch:
                pipe.evalsha(self._shas[call.source], len(call.keys), *call.keys, *call.args)
            results = pipe.execute(raise_on_error=False)
        except Exception as err:  # the whole batch failed to reach the store
            failure = _failure(err)
            for call in batch:
                call.error = failure
            return
        again = []
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError) and reload_once:
                again.append(call)  # not run (the store restarted or failed over): load and send again
            elif isinstance(result, Exception):
                call.error = _failure(result)
            else:
                call.result = result
        if again:
            self._shas.clear()
            self._execute(again, reload_once=False)


def _failure(err: Exception) -> StateStoreError:
    try:
        return translate(err)
    except Exception as other:  # not a store failure: a bug, reported as "cannot decide" (fail closed)
        return StateStoreError(f"the state store call failed ({type(other).__name__})")
