"""Domain errors → gRPC status codes, in one table.

No exception text leaves the enclave except the messages of errors whose text is written for the caller
(input validation); everything else gets a fixed message and, for unexpected errors, a correlation id
that also appears in the enclave's log next to the real cause. The correlation id travels in the status
message and in the trailing metadata key :data:`CORRELATION_KEY`.

Access refusals (:class:`~nitrovault.errors.AccessError`) carry a generic ``str(err)`` by contract
(``invalid token``, ``permission denied``, ``quota exceeded``); their ``reason`` goes to the audit log only.
A quota refusal adds the trailing metadata key :data:`RETRY_AFTER_KEY`: whole seconds, rounded up.
"""

from __future__ import annotations

import logging
import math
import uuid

import grpc

from enclave_app.models.base import InvalidInputError, UnsupportedCallError
from enclave_app.weights import WeightsIntegrityError
from nitrovault.errors import (
    AuthenticationError,
    NitrovaultError,
    PermissionDeniedError,
    ProtectionUnavailableError,
    QuotaExceededError,
)
from nitrovault.rpc.tensors import TensorFormatError

log = logging.getLogger(__name__)


class NotReadyError(NitrovaultError):
    step = "not-ready"


class OverloadedError(NitrovaultError):
    step = "overloaded"


#: (error class, status code, whether the error's own text may be sent to the caller)
TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, bool], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, True),
    (TensorFormatError, grpc.StatusCode.INVALID_ARGUMENT, True),
    (UnsupportedCallError, grpc.StatusCode.UNIMPLEMENTED, True),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE, False),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, False),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED, False),
    # str() of access errors is generic by contract (errors.py); the reason never leaves the enclave
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, True),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, True),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    # fail closed: limits or audit cannot be enforced right now (state store unreachable, audit withheld)
    (ProtectionUnavailableError, grpc.StatusCode.UNAVAILABLE, True),
    # dynamic weights: a block's in-memory ciphertext did not authenticate; the text names no secret
    (WeightsIntegrityError, grpc.StatusCode.DATA_LOSS, True),
)

_FIXED = {
    grpc.StatusCode.UNAVAILABLE: "enclave is not serving yet",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too many requests in flight; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded",
}


#: trailing metadata key carrying the correlation id of an INTERNAL error
CORRELATION_KEY = "x-correlation-id"
#: trailing metadata key of a quota refusal: seconds (integer, rounded up) until the call would pass
RETRY_AFTER_KEY = "retry-after"


def classify(err: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """The status code, the message safe for the peer and, for unexpected errors, a correlation id."""
    for cls, code, public in TABLE:
        if isinstance(err, cls):
            return code, (str(err) if public else _FIXED[code]), None
    correlation = uuid.uuid4().hex[:16]
    log.error("internal error %s: %s", correlation, type(err).__name__, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})", correlation


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message, _ = classify(err)
    return code, message


async def abort_with(
    context: grpc.aio.ServicerContext,
    err: BaseException,
    classified: tuple[grpc.StatusCode, str, str | None] | None = None,
) -> None:
    """Answer with ``err``'s status (``classified``: the result of :func:`classify` if already made)."""
    if isinstance(err, grpc.aio.AbortError):
        raise err
    code, message, correlation = classified or classify(err)
    trailing: tuple[tuple[str, str], ...] = ((CORRELATION_KEY, correlation),) if correlation else ()
    if isinstance(err, QuotaExceededError):
        trailing += ((RETRY_AFTER_KEY, str(max(1, math.ceil(err.retry_after_s)))),)
    await context.abort(code, message, trailing)
