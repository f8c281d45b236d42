"""The per-boot protections around every call: token → quota → (model) → receipt → audit record.

One :class:`Protections` per enclave boot holds the one :class:`~nitrovault.access.TokenVerifier`, the one
quota ledger (:class:`~nitrovault.access.QuotaLedger` in memory, or
:class:`~nitrovault.state.SharedAdmission`, one round trip to the shared state store per call, from
:meth:`Protections.serving` on, when the measured config names one), the
:class:`~nitrovault.receipts.ReceiptSigner` (made once the sealed model's digest is known) and the one
:class:`~nitrovault.audit.AuditWriter`. All are thread-safe.
This module is pure apart from what it is given (key, clock, sink): the gRPC layer
(:mod:`enclave_app.server`) calls it, and ``bench/bench_protections.py`` measures it in process.

Invariants:

* no issuer in the measured config means every call is refused (``AuthenticationError("no-issuer")``);
* every call is audited exactly once, allowed or refused, with the refusal's ``reason`` (the peer only
  sees the generic status message); records never hold inputs, outputs or tokens;
* a refusal after the token verified (scope, quota, ...) is attributed: the token is checked in two
  steps, :meth:`Protections.identify` (who, checks 1-4) then :meth:`Protections.authorize` (may they call
  this, check 5), and the caller stores the principal in its :class:`CallRecord` between the two;
* a receipt covers SHA-256 of the request bytes as received and of the response message serialized
  deterministically **with its ``receipt`` field unset** (the receipt is set afterwards), and names the
  audit position it extends (:meth:`nitrovault.audit.AuditWriter.position`), so receipts prove which
  records the parent must hold;
* while :attr:`Protections.audit_withheld` reports the log withheld (set by the composition root from
  :meth:`enclave_app.host.AuditShipper.withheld`), :meth:`Protections.check_audit` refuses protected
  calls (``ProtectionUnavailableError("audit-withheld")``: serving on would mean serving unaudited).

Example::

    guard = Protections(config, boot_key, pcr0=pcr0, sink=lines.append)
    call = CallRecord(method="Embed", model=config.model_id, items=3)
    call.principal = guard.identify(metadata)  # known from here on, refused or not
    guard.authorize(call.principal, "Embed")
    call.quota = guard.charge(call.principal, items=3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave_app.config import EnclaveConfig
from enclave_app.metrics import EnclaveMetrics
from enclave_app.outputs import GuardNotes
from enclave_app.status import NotReadyError
from nitrovault.access import Principal, QuotaLedger, QuotaState, TokenVerifier
from nitrovault.audit import AuditWriter
from nitrovault.clock import Clock, utc_now
from nitrovault.errors import (
    AccessError,
    AuthenticationError,
    ConfigError,
    NsmError,
    ProtectionUnavailableError,
    QuotaExceededError,
    StateStoreError,
)
from nitrovault.nsm import Nsm
from nitrovault.receipts import Receipt, ReceiptSigner, enclave_user_data, key_id
from nitrovault.state import SharedAdmission, StateStore

log = logging.getLogger(__name__)

Sink = Callable[[bytes], None]

#: methods whose responses carry a receipt (Generate's: its last message, over the whole stream)
RECEIPTED = frozenset({"Infer", "Embed", "Generate"})
#: largest accepted ``authorization`` metadata value (a token is at most 8 KiB)
MAX_AUTHORIZATION = 8 * 1024 + 16



def _never() -> str | None:
    return None


def boot_key_from_nsm(nsm: Nsm) -> ed25519.Ed25519PrivateKey:
    """The boot's receipt/audit key: Ed25519 seeded with 32 bytes of NSM randomness (never stored)."""
    seed = nsm.get_random()[:32]
    if len(seed) != 32:
        raise NsmError("the NSM returned fewer than 32 random bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of ``authorization: Bearer <token>``; ``AuthenticationError`` when absent or malformed."""
    values = [v for k, v in (metadata or ()) if str(k).lower() == "authorization"]
    if not values:
        raise AuthenticationError("missing-token")
    value = values[0]
    if len(values) != 1 or not isinstance(value, str) or len(value) > MAX_AUTHORIZATION:
        raise AuthenticationError("malformed")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("malformed")
    return token.strip()


@dataclass
class CallRecord:
    """What the audit log learns about one call (filled as the call goes on)."""

    method: str
    model: str
    principal: Principal | None = None
    items: int = 0
    quota: QuotaState | None = None
    receipt_id: str | None = None
    #: what the output guard noted (extraction evidence, privacy budget left)
    notes: GuardNotes = field(default_factory=GuardNotes)


class Protections:
    """Token, quota, receipt and audit for one boot (module docstring)."""

    def __init__(self, config: EnclaveConfig, boot_key: ed25519.Ed25519PrivateKey, *, pcr0: bytes,
                 sink: Sink, clock: Clock = utc_now) -> None:
        self.config = config
        self.boot_key = boot_key
        self.key_id = key_id(boot_key.public_key())
        self.user_data = enclave_user_data(boot_key.public_key())
        self._pcr0 = pcr0
        self._clock = clock
        access = config.access
        self.verifier: TokenVerifier | None = access.verifier(clock=clock) if access.enabled else None
        #: the in-memory quota ledger; None when the config names a shared store, whose admission
        #: (:meth:`admit`, from :meth:`serving` on) charges instead: until then nobody is charged (the call
        #: is refused as not ready)
        self.ledger: QuotaLedger | None = None if config.state_store is not None else (
            QuotaLedger(access.quota_tiers(), clock=clock, max_subjects=access.max_subjects))
        self.audit = AuditWriter(boot_key, sink=sink, checkpoint_every=config.audit.checkpoint_every,
                                 max_buffered=config.audit.max_buffered, clock=clock)
        self.signer: ReceiptSigner | None = None
        #: says why the audit log counts as withheld (``None``: it does not); set by the composition root
        self.audit_withheld: Callable[[], str | None] = _never
        #: a call's limits in one round trip to the shared store (from :meth:`serving`, with a store)
        self.admission: SharedAdmission | None = None
        #: the aggregate metrics every recorded call is counted in (set by the service)
        self.metrics: EnclaveMetrics | None = None

    @property
    def shared(self) -> bool:
        """Whether limits are charged in the shared state store (a round trip: keep it off the event loop)."""
        return self.admission is not None

    def serving(self, sealed_digest_hex: str, store: StateStore | None = None) -> None:
        """The model is loaded: receipts can name its sealed digest from now on, and quotas are charged
        in ``store`` when the config names one."""
        if self.config.state_store is not None:
            if store is None:
                raise ConfigError("the measured config names a state store but none was opened")
            self.admission = SharedAdmission(store, self.config.access.quota_tiers(),
                                             self.config.protection.budget_policy, clock=self._clock)
        self.signer = ReceiptSigner(self.boot_key, model_id=self.config.model_id,
                                    sealed_digest=bytes.fromhex(sealed_digest_hex), pcr0=self._pcr0,
                                    clock=self._clock)

    # -- the steps, in order --------------------------------------------------------------------------

    def identify(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        """Steps 1-4 of the token check: who is calling (``AuthenticationError`` when nobody valid)."""
        if self.verifier is None:
            raise AuthenticationError("no-issuer")
        return self.verifier.authenticate(bearer_token(metadata))

    def authorize(self, principal: Principal, method: str) -> None:
        """Step 5: the principal's scopes allow ``method`` on the configured model
        (``PermissionDeniedError`` otherwise)."""
        TokenVerifier.authorize(principal, method=method, model=self.config.model_id)

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None, method: str) -> Principal:
        """Steps 1-5 in one call (:meth:`identify` then :meth:`authorize`). A caller that audits should
        use the two steps, so that a scope refusal's record names the principal."""
        principal = self.identify(metadata)
        self.authorize(principal, method)
        return principal

    def check_audit(self) -> None:
        """Refuse protected calls while the parent withholds the audit log beyond the measured bound
        (``ProtectionUnavailableError("audit-withheld")``): serving on would mean serving unaudited."""
        if self.audit_withheld() is not None:
            raise ProtectionUnavailableError("audit-withheld")

    def admit(self, call: CallRecord, items: int, *, privacy: tuple[float, float] | None,
              refusals: bool) -> None:
        """With the shared store: the call's extraction refusal check, quota charge and (``privacy``: the
        answer's (ε, δ)) budget spend in one atomic round trip; the states go into ``call``. A spend is
        given back with :meth:`refund` when the answer is not released."""
        principal = call.principal
        if self.admission is None or principal is None:
            raise NotReadyError("limits not ready")
        admitted = self.admission.admit(principal.subject, principal.tier, items, privacy=privacy,
                                        refusals=refusals, soft=True)
        call.quota = admitted.quota
        if admitted.budget_refused:  # refused when the noise would be added: after the monitor's look
            call.notes.budget_refused_in_s = admitted.refill_in_s
        elif privacy is not None and admitted.budget is not None:
            call.notes.precharge(privacy, items, admitted.budget)

    def refund(self, call: CallRecord) -> None:
        """Give back the call's budget spend (its answer was not released); best effort, logged."""
        spent = call.notes.precharged
        if spent is None or self.admission is None or call.principal is None:
            return
        call.notes.precharged = None
        call.notes.privacy = None  # the record shows no spend, as for an answer refused before the noise
        try:
            self.admission.refund(call.principal.subject, spent)
        except Exception as err:  # the spend then stands: stricter for the subject, never laxer
            log.warning("privacy refund failed (%s): the spend stands", type(err).__name__)

    def charge(self, principal: Principal, items: int) -> QuotaState:
        if self.ledger is None:
            raise NotReadyError("limits not ready")
        return self.ledger.charge(principal.subject, principal.tier, items)

    def charge_items(self, principal: Principal, items: int) -> QuotaState:
        """Charge ``items`` more to a call already admitted (a stream's generated tokens): the day's items
        only, no request (``QuotaExceededError("daily-items")`` when the allowance runs out). With the
        shared store this is a round trip: call it off the event loop."""
        if self.admission is not None:
            quota = self.admission.admit(principal.subject, principal.tier, items, request=False).quota
            if quota is None:  # asked for: the script answers it whenever it admits
                raise StateStoreError("the state store answered a limit script unexpectedly")
            return quota
        if self.ledger is None:
            raise NotReadyError("limits not ready")
        return self.ledger.charge(principal.subject, principal.tier, items, request=False)

    def sign(self, principal: Principal, method: str, request_bytes: bytes, response_bytes: bytes) -> Receipt:
        if self.signer is None:  # serving() comes before any model call can succeed
            raise RuntimeError("receipt signer used before the model was loaded")
        return self.signer.sign(principal.subject, method, request_bytes, response_bytes,
                                audit=self.audit.position())

    def record(self, call: CallRecord, *, decision: str, latency_us: int, reason: str | None = None,
               code: str = "OK") -> None:
        """Append the call's audit record (never raises: a refused record is logged, serving goes on) and
        count the call in the aggregate metrics (method, status, decision and reason slug only)."""
        if self.metrics is not None:
            self.metrics.call(call.method, code, latency_us / 1e6, decision=decision, reason=reason)
        principal = call.principal
        quota = call.quota
        body: dict[str, Any] = {
            "subject": None if principal is None else principal.subject,
            "token_id": None if principal is None else principal.token_id,
            "tier": None if principal is None else principal.tier,
            "method": call.method, "model": call.model, "items": call.items,
            "decision": decision, "code": code, "reason": reason,
            "latency_us": latency_us, "receipt": call.receipt_id,
            "quota": None if quota is None else {
                "remaining_requests": quota.remaining_requests, "remaining_items": quota.remaining_items,
                "tokens": math.floor(quota.tokens),
            },
        }
        protection = call.notes.to_audit()
        if protection is not None:
            body["protection"] = protection
        try:
            self.audit.append(body)
        except Exception as err:  # the audit log must never take serving down; say so loudly
            log.error("audit record refused: %s", type(err).__name__)

    @staticmethod
    def decision_of(err: BaseException) -> tuple[str, str | None]:
        """``("denied", reason)`` for refusals, ``("error", class name)`` for everything else."""
        if isinstance(err, AccessError):
            return ("quota" if isinstance(err, QuotaExceededError) else "denied"), err.reason
        return "error", type(err).__name__

    def close(self) -> None:
        """Final signed checkpoint (call once, at shutdown)."""
        self.audit.close()
