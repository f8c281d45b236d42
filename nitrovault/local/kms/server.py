"""The KMS emulator's HTTP shell: KMS JSON 1.1 over ``http.server.ThreadingHTTPServer``, plain or TLS.

A request is ``POST /`` with ``X-Amz-Target: TrentService.<Operation>``, ``Content-Type:
application/x-amz-json-1.1`` and a SigV4 ``Authorization`` header; the answer is 200 with a JSON body, or
a non-2xx status with ``{"__type": "<Code>", "message": "..."}`` (what botocore parses into
``ClientError``). This module only translates: SigV4 in :mod:`.sigv4`, operations in :mod:`.operations`.

Invariants:

* Bodies above :data:`MAX_BODY` (1 MiB) are refused with 413 before they are read.
* A refusal is 400, except ``DryRunOperationException`` (412, as AWS answers it).
* A bug answers 500 ``KMSInternalException`` with a fixed message; the traceback goes to the server's
  log, never to the client. Request bodies, secrets and key material are never logged.
* With TLS, the handshake runs in the connection's own thread (``socketserver.ThreadingMixIn`` starts
  one per accepted connection; the listening socket stays plain TCP, so ``accept`` never reads from a
  client) and has :data:`HANDSHAKE_TIMEOUT_S` to finish: a client that stalls, sends garbage or hangs up
  mid-handshake costs its own thread only, and is logged at debug level.

Example (see ``tests/integration/test_kms_emulator.py``)::

    emulator = KmsEmulator(state_dir, root_cert, principals, region="us-east-1")
    running = emulator.serve("127.0.0.1", 0, tls=KmsTls.ensure(d, ["us-east-1"]).server_context())
    boto3.client("kms", endpoint_url=running.endpoint_url, verify=str(d / "ca.pem"), ...)
    emulator.shutdown()
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError, KeyReleaseError
from nitrovault.local.kms.operations import DRY_RUN_CODE, AuditSink, Operations, stderr_audit
from nitrovault.local.kms.sigv4 import Credentials, verify_request
from nitrovault.local.kms.store import Store

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
#: the region given to keys of older state that carry none, when no region is configured
DEFAULT_REGION = "us-east-1"
#: the HTTP status of a refusal, by KMS error code (every other refusal is 400)
STATUS_BY_CODE = {DRY_RUN_CODE: 412}



def load_principals(path: str | os.PathLike[str]) -> dict[str, Credentials]:
    """Read ``{"AKID": {"secret": "...", "arn": "arn:aws:iam::ACCOUNT:..."}}``; ``session_token`` optional."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read principals file {path}: {type(exc).__name__}") from None
    return parse_principals(raw)


def parse_principals(raw: object) -> dict[str, Credentials]:
    if not isinstance(raw, dict):
        raise ConfigError("principals must be a JSON object of access key id -> {secret, arn}")
    out: dict[str, Credentials] = {}
    for akid, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) - {"secret", "arn", "session_token"}:
            raise ConfigError(f"principal {akid}: only 'secret', 'arn' and 'session_token' are allowed")
        secret, arn = entry.get("secret"), entry.get("arn")
        if not isinstance(secret, str) or not secret or not isinstance(arn, str):
            raise ConfigError(f"principal {akid}: 'secret' and 'arn' must be non-empty strings")
        parts = arn.split(":")
        if len(parts) < 6 or parts[0] != "arn" or parts[2] not in ("iam", "sts") or not parts[4].isdigit():
            raise ConfigError(f"principal {akid}: {arn!r} is not an IAM/STS principal ARN")
        token = entry.get("session_token")
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"principal {akid}: 'session_token' must be a string")
        out[str(akid)] = Credentials(secret=secret, arn=arn, session_token=token)
    return out


@dataclass(frozen=True)
class RunningKms:
    """A serving emulator: where it listens."""

    host: str
    port: int
    tls: bool = False

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


#: a TLS client has this long to finish its handshake (in the connection's own thread)
HANDSHAKE_TIMEOUT_S = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: KmsEmulator
    tls_context: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails its handshake or drops the connection costs only its own thread."""
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    #: idle keep-alive connections are closed after this many seconds (urllib3 reconnects transparently)
    timeout = 120
    server_version = "nitrovault-kms-emulator"

    def setup(self) -> None:
        """TLS is negotiated here, in the connection's thread, never in ``accept``: a client that stalls
        or sends garbage cannot hold up anyone else. A failed handshake raises (the server's
        ``handle_error`` logs it at debug level) after closing the connection."""
        context = self.server.tls_context
        if context is not None:
            tls = context.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
            try:
                tls.settimeout(HANDSHAKE_TIMEOUT_S)
                tls.do_handshake()
            except BaseException:
                tls.close()
                raise
            self.request = tls
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if isinstance(self.request, ssl.SSLSocket):  # socketserver only closes the plain socket,
                self.request.close()                      # which wrap_socket has detached

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self, status: int, body: Mapping[str, Any], *, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, *, close: bool = False) -> None:
        self._answer(status, {"__type": code, "message": message}, close=close)

    def do_GET(self) -> None:
        self._error(405, "UnknownOperationException", "The KMS JSON protocol only uses POST /", close=True)

    do_PUT = do_DELETE = do_GET

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "ValidationException", "Content-Length is required", close=True)
            return
        if length < 0 or length > MAX_BODY:
            self._error(413, "ValidationException", f"Request body exceeds {MAX_BODY} bytes", close=True)
            return
        body = self.rfile.read(length)
        status, answer = self.server.emulator.handle_http(
            "POST", self.path, {k: v for k, v in self.headers.items()}, body
        )
        self._answer(status, answer)


class KmsEmulator:
    """The KMS emulator: state on disk, a trust root for attestation, principals, a clock.

    ``root_cert`` is the root attestation documents must chain to (``None``: the pinned AWS Nitro root);
    ``region`` (one name or several) set means SigV4 scopes must name one of them, and the first one is
    the region given to keys of older state that carry none (unset: :data:`DEFAULT_REGION`); unset,
    any region is served. Either way
    the scope's region is the request's region, and keys are regional (see :mod:`.operations`).
    ``clock`` drives SigV4 freshness, attestation verification, rotation and deletion; ``audit``
    receives one mapping per recipient decision.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        root_cert: x509.Certificate | None,
        principals: Mapping[str, Credentials],
        region: str | Sequence[str] | None = None,
        *,
        clock: Clock = utc_now,
        max_document_age: timedelta = timedelta(minutes=5),
        unsafe_allow_debug_attestation: bool = False,
        random: Callable[[int], bytes] = os.urandom,
        audit: AuditSink = stderr_audit,
    ) -> None:
        if unsafe_allow_debug_attestation:
            log.warning("UNSAFE: KMS emulator started with --unsafe-allow-debug-attestation: debug-mode "
                        "enclaves (all-zero PCRs) can obtain keys their policy names")
        self.principals = dict(principals)
        self.regions: tuple[str, ...] | None = (
            None if region is None else (region,) if isinstance(region, str) else tuple(region))
        if self.regions is not None and not self.regions:
            raise ConfigError("region: give at least one region, or None for any")
        self.clock = clock
        store = Store(state_dir, default_region=self.regions[0] if self.regions else DEFAULT_REGION)
        self.operations = Operations(
            store, clock=clock, root=root_cert, max_document_age=max_document_age,
            unsafe_allow_debug_attestation=unsafe_allow_debug_attestation, random=random, audit=audit,
        )
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def handle_http(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """One request, transport-free: returns (status, JSON body). Never raises."""
        try:
            lower = {k.lower(): v for k, v in headers.items()}
            if path.partition("?")[0] != "/":
                return 404, {"__type": "UnknownOperationException", "message": "Only POST / is served."}
            target = lower.get("x-amz-target", "")
            if not target.startswith(TARGET_PREFIX):
                return 400, {"__type": "UnknownOperationException",
                             "message": "X-Amz-Target must be TrentService.<Operation>"}
            caller = verify_request(method, path, headers, body, creds=self.principals, now=self.clock(),
                                    region=self.regions)
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                request = None
            if not isinstance(request, dict):
                return 400, {"__type": "SerializationException", "message": "The body is not a JSON object."}
            return 200, self.operations.handle(target[len(TARGET_PREFIX):], caller, request)
        except KeyReleaseError as exc:
            code = exc.code or "ValidationException"
            return STATUS_BY_CODE.get(code, 400), {"__type": code, "message": str(exc)}
        except Exception:
            log.exception("KMS emulator internal error")
            return 500, {"__type": "KMSInternalException", "message": "The request failed (internal error)."}

    def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None
    ) -> RunningKms:
        """Start serving in a background thread; port 0 picks a free port (see the result). With ``tls``
        (a server context, e.g. :meth:`nitrovault.local.kms.tls.KmsTls.server_context`), HTTPS only."""
        if self._server is not None:
            raise RuntimeError("already serving")
        server = _Server((host, port), _Handler)
        server.emulator = self
        server.tls_context = tls
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kms-emulator", daemon=True)
        self._thread.start()
        return RunningKms(host=host, port=int(server.server_address[1]), tls=tls is not None)

    def shutdown(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
