"""The enclave's one measured configuration file.

The file is baked into the enclave image, so it is covered by PCR2 (and PCR0): trust roots, the KMS key,
the region, the model identity and the limits can never be supplied by the (untrusted) parent at run time.
Unknown keys are rejected, so a typo cannot silently fall back to a default.

Example (JSON)::

    {
      "model_id": "all-minilm-l6-v2", "model_version": "1", "handler": "sentence-embedding",
      "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/...", "region": "us-east-1",
      "encryption_context": {"model": "all-minilm-l6-v2", "version": "1"},
      "sealed_digest": "<64 hex digits: nitrovault seal prints it>",
      "kms_ca_bundle": "-----BEGIN CERTIFICATE-----...(Amazon Trust Services roots)",
      "access": {"issuer": "https://issuer.example", "audience": "nitrovault",
                 "jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "...", "kid": "k1"}]},
                 "tiers": {"default": {"rate_per_s": 50, "burst": 100}}, "default_tier": "default"},
      "audit": {"checkpoint_every": 100, "max_buffered": 10000, "max_withheld_records": 1000,
                "max_withheld_s": 60},
      "state_store": {"host": "master.nv-state.abc123.use1.cache.amazonaws.com",
                      "ca_bundle": "-----BEGIN CERTIFICATE-----...(Amazon Trust Services roots)"},
      "protection": {"hardening": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
                     "privacy": null, "extraction": {"volume_max": 2000},
                     "watermark": {"embedding": null, "text": null}}
    }

Access is **fail closed**: a config without ``access.issuer`` loads (so tools can inspect it), but the
enclave refuses to boot with it and its server refuses every call (``UNAUTHENTICATED``, audit reason
``no-issuer``). There is no anonymous serving mode.

Key release is **pinned**: ``sealed_digest`` (the one sealed model this image serves) and ``kms_ca_bundle``
(the CAs trusted for KMS's TLS certificate) are required, the KMS endpoint is ``https`` only, and the
in-enclave forwarder is always on (docs/confidential-serving.md, "Key release").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from nitrovault.access import QuotaPolicy, QuotaTiers, TokenVerifier
from nitrovault.access.tokens import DEFAULT_MAX_LIFETIME_S, MAX_LIFETIME_S
from nitrovault.clock import Clock
from nitrovault.errors import ConfigError
from nitrovault.kms.endpoints import kms_hostname
from nitrovault.protection import BudgetPolicy, ExtractionPolicy, HardeningPolicy, PrivacyMechanism
from nitrovault.state.store import StoreSettings

#: where the in-enclave KMS forwarder listens on 127.0.0.1 unless the config says otherwise
DEFAULT_KMS_FORWARDER_PORT = 8000
_DIGEST = re.compile(r"[0-9a-f]{64}")

_DEFAULT_TIERS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"default": MappingProxyType({"rate_per_s": 50.0, "burst": 100})}
)


@dataclass(frozen=True)
class Ports:
    """vsock ports (docs/design.md): the parent is CID 3, the enclave serves inference on ``inference``."""

    #: CID of the parent instance (always 3 on Nitro).
    parent_cid: int = 3
    #: CID the enclave is started with (``nitro-cli run-enclave --enclave-cid``).
    enclave_cid: int = 16
    #: vsock port the enclave's gRPC server is reached on (through the in-enclave relay).
    inference: int = 5000
    #: parent vsock port of the KMS proxy (vsock-proxy in production).
    kms_proxy: int = 8000
    #: parent vsock port of the host services (credentials, sealed model, status, audit sink).
    host_services: int = 8001
    #: parent vsock port relaying to the shared state store (a second vsock-proxy in production).
    state_store: int = 8002


@dataclass(frozen=True)
class Limits:
    """Serving limits, enforced inside the enclave."""

    #: largest accepted request message, in bytes.
    max_request_bytes: int = 4 * 1024 * 1024
    #: largest response message, in bytes.
    max_response_bytes: int = 8 * 1024 * 1024
    #: most items (texts or rows) in one call.
    max_batch: int = 64
    #: requests that may wait for a worker; beyond it calls get RESOURCE_EXHAUSTED.
    queue_depth: int = 64
    #: model workers; 0 means one per vCPU the enclave has (one with dynamic weights).
    workers: int = 0
    #: longest text accepted by Embed, in characters.
    max_text_chars: int = 8192
    #: most elements in one input tensor.
    max_tensor_elements: int = 1 << 22
    #: largest sealed model the enclave accepts from the parent, in bytes.
    max_model_bytes: int = 8 << 30
    #: HTTP/2 streams one client connection may hold open at once (any method).
    max_streams_per_connection: int = 32
    #: health ``Watch`` streams open at once over all connections (they need no token); beyond it a new
    #: ``Watch`` gets RESOURCE_EXHAUSTED, so unauthenticated long-lived calls cannot starve the others.
    max_watch_streams: int = 16
    #: ``Attest`` calls signed at once (they need no token: a client attests before it sends one, and
    #: each is an NSM signature); more wait for a slot, up to ``attestation_queue`` of them.
    max_concurrent_attestations: int = 4
    #: ``Attest`` calls that may wait for a slot (a fleet of clients reconnecting at once); beyond it
    #: RESOURCE_EXHAUSTED at once.
    attestation_queue: int = 256

    def __post_init__(self) -> None:
        for name in ("max_streams_per_connection", "max_watch_streams", "max_concurrent_attestations",
                     "attestation_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Limits.{name} must be a positive integer")


@dataclass(frozen=True)
class Batching:
    """How the model workers gather concurrent calls into one forward pass (docs/serving.md).

    A free worker takes the oldest queued call and every later queued call it can share a forward pass
    with (same method, same shapes), up to ``max_rows`` rows, waiting at most ``max_delay_ms`` after the
    oldest call arrived. Under load calls pile up while the workers are busy, so batches form without any
    delay; a delay only helps a lightly loaded enclave trade latency for throughput.

    Streams: every ``Generate`` message costs a quota charge, a receipt-transcript entry and a TLS record
    through two relays, which for a small fast model costs more than the tokens themselves; text released
    within ``stream_interval_ms`` of the previous message is sent as one (no delay for the first piece,
    none at all for models slower than one token per interval).

    Threads: a CPU enclave is the whole budget. Each of ``limits.workers`` workers runs torch with
    ``torch_threads`` intra-op threads (0: the enclave's vCPUs divided by the workers, at least 1) so that
    workers x threads never oversubscribes the vCPUs (oversubscribed BLAS threads spin against each
    other); ``interop_threads`` stays 1 because the served models run one graph at a time.
    """

    #: most rows (texts or tensor rows) in one forward pass; 1 turns batching off.
    max_rows: int = 32
    #: how long a free worker waits for more calls to join the oldest one, in milliseconds (0..1000).
    max_delay_ms: float = 0.0
    #: torch intra-op threads per worker; 0 means vCPUs // workers (at least 1).
    torch_threads: int = 0
    #: torch inter-op threads (process wide).
    interop_threads: int = 1
    #: ``Generate``: after a message, text released within this many milliseconds (0..1000) joins the next
    #: one. The first piece is always sent at once; 0 sends every piece as soon as it is final.
    stream_interval_ms: float = 20.0

    def __post_init__(self) -> None:
        for name in ("max_rows", "interop_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Batching.{name} must be a positive integer")
        if not isinstance(self.torch_threads, int) or isinstance(self.torch_threads, bool) or (
                self.torch_threads < 0):
            raise ConfigError("Batching.torch_threads must be 0 (automatic) or a positive integer")
        for name in ("max_delay_ms", "stream_interval_ms"):
            delay = getattr(self, name)
            if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= 1000:
                raise ConfigError(f"Batching.{name} must be a number of milliseconds in [0, 1000]")

    def threads_per_worker(self, workers: int, vcpus: int) -> int:
        """Intra-op threads for each of ``workers`` workers on ``vcpus`` vCPUs."""
        return self.torch_threads or max(1, vcpus // max(1, workers))


@dataclass(frozen=True)
class Access:
    """Who may call and how much (docs/access-and-audit.md). Measured: the parent cannot change it."""

    #: the ``iss`` every token must carry; empty: no issuer, so nothing is served (fail closed).
    issuer: str = ""
    #: the ``aud`` every token must contain.
    audience: str = ""
    #: the issuer's public keys, a JWKS object ``{"keys": [...]}`` baked in (several kids for rotation);
    #: ES256, EdDSA or RS256 keys only, public parts only. Never fetched at run time.
    jwks: Mapping[str, Any] = field(default_factory=dict)
    #: clock skew accepted on ``exp``/``nbf``/``iat``, in seconds (0..300).
    leeway_s: int = 30
    #: longest token lifetime accepted, in seconds (1..31 622 400, i.e. 366 days): a token whose
    #: ``exp - iat`` exceeds it, or whose ``exp`` is further than it (plus ``leeway_s``) from now, is
    #: refused (audit reason ``lifetime``), so a leaked token is only good for so long.
    max_token_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    #: quota tiers: name -> ``{"rate_per_s": float, "burst": int, "daily_requests": int|null,
    #: "daily_items": int|null}``; a token's ``tier`` claim picks one.
    tiers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _DEFAULT_TIERS)
    #: the tier of tokens without a ``tier`` claim; must be one of ``tiers``.
    default_tier: str = "default"
    #: most subjects whose quota counters are kept (least recently charged evicted beyond it).
    max_subjects: int = 10_000

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)

    def verifier(self, *, clock: Clock | None = None) -> TokenVerifier:
        if not self.enabled:
            raise ConfigError("access.issuer is not configured: the enclave serves nobody (fail closed)")
        if clock is None:
            return TokenVerifier(self.issuer, self.audience, self.jwks, leeway_s=self.leeway_s,
                                 max_lifetime_s=self.max_token_lifetime_s)
        return TokenVerifier(self.issuer, self.audience, self.jwks, leeway_s=self.leeway_s,
                             max_lifetime_s=self.max_token_lifetime_s, clock=clock)

    def quota_tiers(self) -> QuotaTiers:
        policies: dict[str, QuotaPolicy] = {}
        for name, spec in self.tiers.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"access.tiers.{name} must be an object")
            unknown = sorted(set(spec) - {"rate_per_s", "burst", "daily_requests", "daily_items"})
            if unknown or "rate_per_s" not in spec or "burst" not in spec:
                raise ConfigError(f"access.tiers.{name} needs rate_per_s and burst (unknown: {unknown})")
            try:
                policies[name] = QuotaPolicy(
                    float(spec["rate_per_s"]), int(spec["burst"]),
                    None if spec.get("daily_requests") is None else int(spec["daily_requests"]),
                    None if spec.get("daily_items") is None else int(spec["daily_items"]),
                )
            except (TypeError, ValueError):
                raise ConfigError(f"access.tiers.{name} has a value of the wrong type") from None
        return QuotaTiers(policies, default=self.default_tier)


@dataclass(frozen=True)
class Audit:
    """The audit log (chained, signed, streamed to the parent's sink)."""

    #: a signed checkpoint after this many records (and a final one at shutdown).
    checkpoint_every: int = 100
    #: chained entries kept while the parent's sink is down; beyond it records are counted as lost
    #: and a signed gap entry reports them once the sink is back.
    max_buffered: int = 10_000
    #: audit entries the parent may leave unacknowledged (queued, buffered or lost) before protected
    #: calls are refused with UNAVAILABLE (reason ``audit-withheld``) until it stores them again.
    max_withheld_records: int = 1_000
    #: seconds the parent's audit sink may stay down before protected calls are refused the same way.
    max_withheld_s: int = 60


@dataclass(frozen=True)
class StateStoreConfig:
    """The shared state store (Valkey/Redis) holding quotas, privacy budgets and extraction refusals for
    every enclave of the deployment (``docs/access-and-audit.md``). Measured: its host name and CA decide
    who the enclave believes is the store; the user's password is sealed with the model."""

    #: the store's host name (ElastiCache's primary endpoint): SNI and the name its certificate carries.
    #: No port: the enclave reaches the store only through vsock ``ports.state_store``, where the parent's
    #: proxy connects to the one endpoint it allowlists (the enclave's TLS is what makes that safe).
    host: str
    #: PEM CA certificates trusted for the store's TLS certificate (Amazon's roots for ElastiCache).
    ca_bundle: str
    #: the RBAC user the sealed password belongs to (``nitrovault seal --state-store-password-file``).
    username: str = "nitrovault-enclave"
    #: key namespace (deployments sharing one store keep apart); empty: the model id.
    namespace: str = ""
    #: milliseconds to connect or to get an answer before the store counts as unreachable.
    timeout_ms: int = 500

    def settings(self, model_id: str) -> StoreSettings:
        return StoreSettings(host=self.host, ca_bundle=self.ca_bundle, username=self.username,
                             namespace=self.namespace or model_id, timeout_s=self.timeout_ms / 1000.0)


WEIGHT_MODES = ("resident", "dynamic")


@dataclass(frozen=True)
class WeightsPolicy:
    """``protection.weights``: whether the selected tensors stay encrypted in enclave memory between uses
    (``enclave_app/weights.py``, docs/dynamic-weights.md)."""

    #: ``resident`` (every tensor plaintext for the enclave's life) or ``dynamic``
    mode: str = "resident"
    #: fnmatch patterns over the handler module's parameter names (each must match a tensor of the sealed
    #: model); None: every weight matrix of the model's numbered blocks
    tensors: tuple[str, ...] | None = None
    #: most blocks decrypted at any instant (>= 1; 2 lets the next block decrypt during the current one)
    budget: int = 1

    @property
    def dynamic(self) -> bool:
        return self.mode == "dynamic"

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> WeightsPolicy:
        """The section as written (null: resident); anything malformed is a :class:`ConfigError`."""
        if section is None:
            return cls()
        unknown = sorted(set(section) - {"mode", "tensors", "budget"})
        if unknown:
            raise ConfigError(f"unknown Protection.weights key(s): {', '.join(unknown)}")
        mode = section.get("mode", "resident")
        if mode not in WEIGHT_MODES:
            raise ConfigError(f"Protection.weights.mode must be one of {', '.join(WEIGHT_MODES)}")
        tensors = section.get("tensors")
        if tensors is not None:
            if not isinstance(tensors, list | tuple) or not tensors or not all(
                    isinstance(p, str) and p.strip() and len(p) <= 256 for p in tensors):
                raise ConfigError("Protection.weights.tensors must be a non-empty list of name patterns "
                                  "or null")
            tensors = tuple(tensors)
        budget = section.get("budget", 1)
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= 64:
            raise ConfigError("Protection.weights.budget must be an integer in [1, 64] (decrypted blocks)")
        return cls(mode=mode, tensors=tensors, budget=budget)


@dataclass(frozen=True)
class Protection:
    """What a caller gets to see of the model's answers (docs/model-stealing.md, docs/watermarks.md).

    Every section is measured, so the policy a client is served under is part of what PCR0/PCR2 attest.
    Sections are kept as the JSON mappings they were written as (so :meth:`EnclaveConfig.to_json`
    round-trips) and validated when the config loads; the parsed policies are properties.
    """

    #: output hardening (:class:`~nitrovault.protection.HardeningPolicy` config). Classifier kinds apply
    #: to ``Infer``'s ``probabilities`` output, embedding kinds to ``Embed``'s vectors. Default: ``full``.
    hardening: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({"kind": "full"}))
    #: calibrated noise: ``{"mechanism": {...PrivacyMechanism}, "budget": {...BudgetPolicy}}``; null: off.
    privacy: Mapping[str, Any] | None = None
    #: extraction detection (:class:`~nitrovault.protection.ExtractionPolicy` fields); null: off.
    extraction: Mapping[str, Any] | None = None
    #: output watermarks: ``{"embedding": {"triggers": 20, "max_triggers": 4} | null,
    #: "text": {"gamma": 0.25, "delta": 2.0} | null}``. The owner secret (and the embedding mark's
    #: candidate words) travel encrypted in the sealed model's metadata, released with the model key.
    #: Either mark may add ``"per_subject": true`` (default false): the mark is keyed by the calling
    #: subject's own key, so a leaked output names its subject (docs/watermarks.md, "Per-subject output
    #: fingerprints"); with it, text carries only the subject's list, not the model's.
    watermark: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({"embedding": None, "text": None})
    )
    #: ``{"mode": "resident" | "dynamic", "tensors": [pattern, ...] | null, "budget": 1}``
    #: (:class:`WeightsPolicy`); null: resident.
    weights: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Protection:
        """Parse and validate a ``protection`` section (every policy is parsed now, so a bad value fails
        the load, never a call)."""
        return _protection(data)

    @property
    def hardening_policy(self) -> HardeningPolicy:
        return HardeningPolicy.from_config(self.hardening)

    @property
    def privacy_mechanism(self) -> PrivacyMechanism | None:
        return None if self.privacy is None else PrivacyMechanism.from_config(self.privacy["mechanism"])

    @property
    def budget_policy(self) -> BudgetPolicy | None:
        return None if self.privacy is None else BudgetPolicy.from_config(self.privacy["budget"])

    @property
    def extraction_policy(self) -> ExtractionPolicy | None:
        return None if self.extraction is None else ExtractionPolicy.from_config(self.extraction)

    @property
    def weights_policy(self) -> WeightsPolicy:
        return WeightsPolicy.from_config(self.weights)

    @property
    def embedding_mark(self) -> Mapping[str, Any] | None:
        """Parameters of the EmbMarker mark, or None when the policy does not ask for it."""
        value: Mapping[str, Any] | None = self.watermark.get("embedding")  # read-only, made so at load
        return value

    @property
    def text_mark(self) -> Mapping[str, Any] | None:
        """Parameters of the green-list mark, or None when the policy does not ask for it."""
        value: Mapping[str, Any] | None = self.watermark.get("text")  # read-only, made so at load
        return value

    @property
    def embedding_per_subject(self) -> bool:
        """Whether each subject's embeddings are marked toward its own target (``embedding.per_subject``)."""
        return bool((self.embedding_mark or {}).get("per_subject", False))

    @property
    def text_per_subject(self) -> bool:
        """Whether each subject's text is marked with its own green list (``text.per_subject``)."""
        return bool((self.text_mark or {}).get("per_subject", False))

    @property
    def needs_watermark_secret(self) -> bool:
        return self.embedding_mark is not None or self.text_mark is not None


_EMBEDDING_MARK_KEYS = {"triggers": 20, "max_triggers": 4}
_TEXT_MARK_KEYS = {"gamma": 0.25, "delta": 2.0}


def _protection(data: Mapping[str, Any]) -> Protection:
    values = _checked(Protection, data)
    for name in ("hardening", "privacy", "extraction", "watermark", "weights"):
        value = values.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"Protection.{name} must be an object or null")
    if "hardening" in values:
        if values["hardening"] is None:
            raise ConfigError("Protection.hardening must be an object (use {\"kind\": \"full\"})")
        values["hardening"] = MappingProxyType(dict(values["hardening"]))
    privacy = values.get("privacy")
    if privacy is not None:
        unknown = sorted(set(privacy) - {"mechanism", "budget"})
        if unknown or not isinstance(privacy.get("mechanism"), Mapping) or not isinstance(
                privacy.get("budget"), Mapping):
            raise ConfigError(f"Protection.privacy needs 'mechanism' and 'budget' objects ({unknown=})")
        values["privacy"] = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in privacy.items()})
    if values.get("extraction") is not None:
        values["extraction"] = MappingProxyType(dict(values["extraction"]))
    if values.get("weights") is not None:
        weights = dict(values["weights"])
        if isinstance(weights.get("tensors"), list):
            weights["tensors"] = tuple(weights["tensors"])
        values["weights"] = MappingProxyType(weights)
    watermark = dict(values.get("watermark") or {})
    unknown = sorted(set(watermark) - {"embedding", "text"})
    if unknown:
        raise ConfigError(f"unknown Protection.watermark key(s): {', '.join(unknown)}")
    for name, defaults in (("embedding", _EMBEDDING_MARK_KEYS), ("text", _TEXT_MARK_KEYS)):
        spec = watermark.get(name)
        if spec is None:
            watermark[name] = None
            continue
        if not isinstance(spec, Mapping) or set(spec) - set(defaults) - {"per_subject"}:
            raise ConfigError(f"Protection.watermark.{name} takes only {sorted({*defaults, 'per_subject'})}")
        # per_subject is kept only when written: configs without it serialise as they did (same PCRs)
        merged = {**defaults, **spec}
        if any(isinstance(v, bool) or not isinstance(v, type(defaults[k]) | int)
               for k, v in merged.items() if k != "per_subject"):
            raise ConfigError(f"Protection.watermark.{name} values must be numbers (per_subject: a boolean)")
        if not isinstance(merged.get("per_subject", False), bool):
            raise ConfigError(f"Protection.watermark.{name}.per_subject must be true or false")
        watermark[name] = MappingProxyType(merged)
    values["watermark"] = MappingProxyType(watermark)
    protection = Protection(**values)
    # parse every policy now: a bad value fails the config load, never a call
    hardening = protection.hardening_policy
    mechanism, budget = protection.privacy_mechanism, protection.budget_policy
    if mechanism is not None and budget is not None and not budget.admits(mechanism):
        raise ConfigError("Protection.privacy: one answer costs more than the whole budget")
    if mechanism is not None and hardening.kind != "full" and (
            (mechanism.output == "embedding") != hardening.for_embeddings):
        raise ConfigError("Protection.privacy.mechanism.output and Protection.hardening disagree on "
                          "what the model answers (probabilities or embeddings)")
    protection.extraction_policy  # noqa: B018 - validates
    protection.weights_policy  # noqa: B018 - validates
    mark = protection.embedding_mark
    if mark is not None and not 1 <= int(mark["max_triggers"]) <= int(mark["triggers"]) <= 1000:
        raise ConfigError("Protection.watermark.embedding needs 1 <= max_triggers <= triggers <= 1000")
    text = protection.text_mark
    if text is not None and not (0 < float(text["gamma"]) < 1 and 0 <= float(text["delta"]) <= 20):
        raise ConfigError("Protection.watermark.text needs 0 < gamma < 1 and 0 <= delta <= 20")
    return protection


@dataclass(frozen=True)
class EnclaveConfig:
    """Everything the enclave trusts, field by field."""

    #: the model's id; must equal the sealed model's encryption context ``model``.
    model_id: str
    #: the model's version; must equal the sealed model's encryption context ``version``.
    model_version: str
    #: the registered model handler (``sentence-embedding`` or ``generic:<architecture>``).
    handler: str
    #: the KMS key that wraps the model's data key (full ARN; never an alias, which the parent could move).
    kms_key_arn: str
    #: AWS region of the KMS key.
    region: str
    #: the encryption context the sealed model must carry, exactly.
    encryption_context: Mapping[str, str]
    #: SHA-256 (hex) of the sealed header the enclave serves (``nitrovault seal`` prints it). Required: with
    #: the key-committing sealed format (docs/sealed-format.md) it means a parent can only ever make the
    #: enclave serve the exact file the owner sealed.
    sealed_digest: str = ""
    #: the CA certificates (PEM) the enclave trusts for KMS's TLS certificate: Amazon Trust Services'
    #: roots in production (``nitrovault/data/amazon-trust-services.pem``), the KMS emulator's local CA
    #: locally. Required, and never taken from the parent or the environment.
    kms_ca_bundle: str = ""
    #: KMS endpoint as boto3 sees it inside the enclave (``https`` only); empty means the region's real
    #: endpoint, ``https://kms.<region>.amazonaws.com``, reached through the in-enclave forwarder.
    kms_endpoint_url: str = ""
    #: port of the in-enclave forwarder on 127.0.0.1: an HTTP CONNECT proxy (the enclave's only route to
    #: KMS) that tunnels the TLS connection to vsock ``(parent_cid, ports.kms_proxy)``.
    kms_forwarder_port: int = DEFAULT_KMS_FORWARDER_PORT
    ports: Ports = field(default_factory=Ports)
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    access: Access = field(default_factory=Access)
    audit: Audit = field(default_factory=Audit)
    protection: Protection = field(default_factory=Protection)
    #: the shared state store; null: limits live in this enclave's memory only (a restart resets them,
    #: and every enclave of a fleet counts alone: for tests and single-instance trials only).
    state_store: StateStoreConfig | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EnclaveConfig:
        values = _checked(cls, data)
        values["ports"] = Ports(**_checked(Ports, data.get("ports", {})))
        values["limits"] = Limits(**_checked(Limits, data.get("limits", {})))
        values["batching"] = Batching(**_checked(Batching, data.get("batching", {})))
        values["access"] = _access(data.get("access", {}))
        values["audit"] = Audit(**_checked(Audit, data.get("audit", {})))
        values["protection"] = Protection.from_mapping(data.get("protection", {}))
        audit = values["audit"]
        if min(audit.checkpoint_every, audit.max_buffered, audit.max_withheld_records,
               audit.max_withheld_s) < 1:
            raise ConfigError("audit.checkpoint_every, max_buffered, max_withheld_records and max_withheld_s "
                              "must be at least 1")
        store = data.get("state_store")
        if store is not None:
            values["state_store"] = _state_store(store)
        context = values.get("encryption_context")
        if not isinstance(context, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()
        ):
            raise ConfigError("encryption_context must be an object of strings")
        values["encryption_context"] = MappingProxyType(dict(context))
        if not str(values.get("kms_key_arn", "")).startswith("arn:aws"):
            raise ConfigError("kms_key_arn must be a full key ARN")
        _check_key_release(values)
        if values["protection"].weights_policy.dynamic and values["limits"].workers > 1:
            raise ConfigError("Protection.weights.mode dynamic runs one forward pass at a time: "
                              "limits.workers must be 0 or 1 (batching gathers concurrent calls into it)")
        return cls(**values)

    def model_threads(self, vcpus: int) -> tuple[int, int]:
        """The model workers on ``vcpus`` vCPUs (``limits.workers``, 0: one per vCPU, one with dynamic
        weights) and each one's torch intra-op threads (``batching.torch_threads``; docs/serving.md)."""
        workers = self.limits.workers or (1 if self.protection.weights_policy.dynamic else vcpus)
        return workers, self.batching.threads_per_worker(workers, vcpus)

    @property
    def kms_endpoint(self) -> str:
        """The KMS URL boto3 uses: the configured ``https`` one, else the region's real endpoint."""
        return self.kms_endpoint_url or f"https://{kms_hostname(self.region)}"

    @property
    def kms_proxy_url(self) -> str:
        """The in-enclave forwarder as boto3's HTTPS proxy."""
        return f"http://127.0.0.1:{self.kms_forwarder_port}"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EnclaveConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read enclave config {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError("enclave config must be a JSON object")
        return cls.from_mapping(data)

    def to_json(self) -> str:
        def plain(obj: Any) -> Any:
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, Mapping):
                return {k: plain(v) for k, v in obj.items()}
            return obj

        return json.dumps(plain(self), indent=2, sort_keys=True) + "\n"


def _check_key_release(values: Mapping[str, Any]) -> None:
    """What makes key release something a parent cannot subvert: a pinned model, TLS to KMS checked
    against a CA bundle that is part of the measurement, and the forwarder as the only route."""
    digest = values.get("sealed_digest", "")
    if not _DIGEST.fullmatch(digest):
        raise ConfigError("sealed_digest must be the sealed model's SHA-256 digest (64 lower-case hex "
                          "digits, as `nitrovault seal` prints it): the enclave serves exactly one model")
    kms_hostname(str(values.get("region", "")))
    url = values.get("kms_endpoint_url", "")
    if url:
        parsed = urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname or parsed.path not in ("", "/") or (
                parsed.query or parsed.fragment or parsed.username or parsed.password):
            raise ConfigError("kms_endpoint_url must be an https:// URL with a host name and nothing else "
                              "(TLS to KMS is what keeps the parent out of key release)")
    bundle = values.get("kms_ca_bundle", "")
    try:
        certificates = x509.load_pem_x509_certificates(bundle.encode()) if bundle else []
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError("kms_ca_bundle must hold the PEM CA certificates trusted for KMS's TLS certificate")
    port = values.get("kms_forwarder_port", DEFAULT_KMS_FORWARDER_PORT)
    if not 1 <= port <= 65535:
        raise ConfigError("kms_forwarder_port must be a TCP port (1..65535): the forwarder is the "
                          "enclave's only route to KMS")


def _checked(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} section must be an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    nested = {"ports", "limits", "batching", "access", "audit", "protection", "state_store"}
    out: dict[str, Any] = {}
    for name, f in known.items():
        if name in nested or name not in data:
            continue
        value = data[name]
        expected = {"str": str, "int": int, "Mapping[str, str]": Mapping}.get(str(f.type))
        if expected is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise ConfigError(f"{cls.__name__}.{name} must be {f.type!s}")
        out[name] = value
    missing = [n for n, f in known.items() if n not in out and n not in nested and _required(f)]
    if missing:
        raise ConfigError(f"missing {cls.__name__} key(s): {', '.join(missing)}")
    return out


def _access(data: Mapping[str, Any]) -> Access:
    values = _checked(Access, data)
    for name in ("jwks", "tiers"):
        if name in values and not isinstance(values[name], Mapping):
            raise ConfigError(f"Access.{name} must be an object")
    if "jwks" in values:
        values["jwks"] = MappingProxyType(dict(values["jwks"]))
    if "tiers" in values:
        values["tiers"] = MappingProxyType({k: MappingProxyType(dict(v)) if isinstance(v, Mapping) else v
                                            for k, v in values["tiers"].items()})
    access = Access(**values)
    if not 0 < access.max_token_lifetime_s <= MAX_LIFETIME_S:  # checked even when no issuer is set yet
        raise ConfigError(f"Access.max_token_lifetime_s must be between 1 and {MAX_LIFETIME_S} seconds")
    access.quota_tiers()  # validates tiers and the default tier
    if access.enabled:
        access.verifier()  # validates audience, leeway and every JWKS key
    elif access.jwks:
        raise ConfigError("Access.jwks is set but Access.issuer is empty")
    return access


def _state_store(data: Mapping[str, Any]) -> StateStoreConfig:
    values = _checked(StateStoreConfig, data)
    store = StateStoreConfig(**values)
    try:
        certificates = x509.load_pem_x509_certificates(store.ca_bundle.encode())
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigError("state_store.ca_bundle must hold the PEM CA certificates trusted for the store")
    store.settings("model")  # validates host, port, user and timeout
    return store


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING
