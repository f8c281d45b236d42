"""Who may call and how much: bearer-token verification and per-subject quotas, enforced in the enclave.

* :mod:`nitrovault.access.tokens`: :class:`TokenVerifier` (JWT ES256/EdDSA/RS256 against a baked JWKS,
  lifetimes capped at ``max_lifetime_s``, default :data:`DEFAULT_MAX_LIFETIME_S`; ``authenticate`` says who,
  ``authorize`` checks scopes per method and model). Issuing tokens is the owner's side:
  :mod:`nitrovault.owner.issuer`, never in the enclave image.
* :mod:`nitrovault.access.quota`: :class:`QuotaLedger` (token bucket + daily windows, tiers, bounded memory).

Both are pure: time is a parameter, nothing here does I/O. Failures
are :class:`~nitrovault.errors.AccessError` subclasses whose ``reason`` goes to the audit log only.
"""

from nitrovault.access.quota import QuotaLedger, QuotaPolicy, QuotaState, QuotaTiers
from nitrovault.access.tokens import (
    DEFAULT_MAX_LIFETIME_S,
    Principal,
    TokenVerifier,
)

__all__ = [
    "DEFAULT_MAX_LIFETIME_S",
    "Principal",
    "QuotaLedger",
    "QuotaPolicy",
    "QuotaState",
    "QuotaTiers",
    "TokenVerifier",
]
