"""State shared by every enclave of a deployment, in a store only attested enclaves can write.

* :mod:`nitrovault.state.store`: :class:`StateStore`, the TLS connection to Valkey/Redis through the
  parent's relay, authenticated with the credential sealed with the model; :class:`StoreSettings`.
* :mod:`nitrovault.state.limits`: :class:`SharedQuotaLedger`, :class:`SharedPrivacyBudget`,
  :class:`SharedRefusals` and :class:`SharedAggregates`, the in-memory limits' shared twins, each charge
  one atomic server-side script.

Why it exists: limits kept in an enclave's memory are reset by whoever can restart the enclave (the
parent) and are per instance behind a load balancer (``docs/access-and-audit.md``, "Shared limits").
"""

from nitrovault.state.limits import (
    Admitted,
    SharedAdmission,
    SharedAggregates,
    SharedPrivacyBudget,
    SharedQuotaLedger,
    SharedRefusals,
)
from nitrovault.state.store import Route, StateStore, StoreSettings

__all__ = [
    "Admitted",
    "Route",
    "SharedAdmission",
    "SharedAggregates",
    "SharedPrivacyBudget",
    "SharedQuotaLedger",
    "SharedRefusals",
    "StateStore",
    "StoreSettings",
]
