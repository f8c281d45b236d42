"""The enclave's boot sequence: credentials and ciphertext from the parent, key from KMS, weights into
memory, then ready.

1. Fetch AWS credentials and the sealed model from the parent's host services (both untrusted: KMS
   enforces the attestation condition whatever credentials are used, and the weights are authenticated
   by AEAD under the released key).
2. Check the sealed header against the measured config (encryption context, the mandatory digest pin).
3. Attest and release the data key (:mod:`enclave_app.key_release`) over TLS to KMS.
4. Check the header's key commitment against the released key (step ``key-commitment``): a file whose
   chunks were encrypted under any other key is refused before one chunk is decrypted. With the digest
   pin, this is what makes the parent unable to get any model but the owner's served.
5. Unseal straight into tensors (no plaintext is written anywhere), zero the data key.
6. Open the shared state store (step ``state-store``, when the measured config names one) with the
   password sealed with the model: a store that refuses it fails the boot; one that cannot be reached
   yet does not (protected calls get UNAVAILABLE until it can, :mod:`nitrovault.state`).
7. Take the sealed extras (watermark secret → keys, the secret zeroed; the extraction detector's
   reference sample; the fleet's TLS identity, :mod:`nitrovault.identity`, which must be there and
   valid now: without it the enclave could not serve confidentially, so it does not serve at all),
   build the model handler, attach the text watermark when the policy asks for it, warm up, and build
   the boot's :class:`~enclave_app.outputs.OutputGuard`.

Any failure raises a :class:`BootFailure` carrying a coarse, non-secret reason for the parent and the
failed step; the caller reports it and exits non-zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from enclave_app.config import EnclaveConfig
from enclave_app.key_release import release_data_key
from enclave_app.models import ModelHandler, ModelLoadError, load_handler
from enclave_app.models.green_list import WARM_UP_SUBJECT, GreenListProcessor, subject_scope
from enclave_app.outputs import OutputGuard, SealedExtras
from enclave_app.weights import WeightsSelectionError, protect_weights
from nitrovault.clock import utc_now
from nitrovault.envelope import SealedModel, zeroize
from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY
from nitrovault.errors import (
    ConfigError,
    KeyAccessDeniedError,
    KeyCommitmentError,
    KeyReleaseError,
    KmsTlsError,
    NitrovaultError,
    SealedModelError,
    StateStoreCredentialError,
    StateStoreError,
    TlsIdentityError,
)
from nitrovault.identity import SEALED_CHAIN, SEALED_KEY, TlsIdentity
from nitrovault.kms import AwsCredentials, KmsClient
from nitrovault.nsm import Nsm
from nitrovault.state import StateStore

#: opens the shared state store with the sealed password (``enclave_app.main`` routes it via the parent)
StoreFactory = Callable[[str], StateStore]
log = logging.getLogger(__name__)


class HostServices(Protocol):
    """What the enclave asks of the parent during boot (``enclave_app.host`` implements it over vsock)."""

    def credentials(self) -> AwsCredentials: ...

    def sealed_model(self, model_id: str) -> Path: ...


@dataclass(frozen=True)
class BootTimings:
    fetch_s: float
    attestation_s: float
    kms_s: float
    unseal_s: float
    model_load_s: float
    total_s: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BootResult:
    handler: ModelHandler
    sealed_digest: str
    timings: BootTimings
    outputs: OutputGuard
    #: the TLS identity sealed with the model: the gRPC server terminates TLS with it
    tls: TlsIdentity
    #: the shared state store (quotas, budgets, extraction refusals), or None: limits in memory only
    store: StateStore | None = None


class BootFailure(NitrovaultError):
    """Boot failed at ``step``; ``reason`` is coarse and safe to hand to the parent."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


def boot(
    config: EnclaveConfig,
    *,
    host: HostServices,
    nsm: Nsm,
    kms_factory: Callable[[AwsCredentials], KmsClient],
    user_data: bytes | None = None,
    store_factory: StoreFactory | None = None,
) -> BootResult:
    started = time.perf_counter()
    step = "fetch"
    try:
        credentials = host.credentials()
        sealed = SealedModel.open(host.sealed_model(config.model_id))
        fetched = time.perf_counter()

        step = "key-release"
        data_key, release = release_data_key(
            config, sealed.header, nsm=nsm, kms=kms_factory(credentials), user_data=user_data
        )

        unseal_started = time.perf_counter()
        try:
            step = "key-commitment"
            sealed.verify_key(data_key)
            step = "unseal"
            tensors = sealed.load_tensors(data_key)
            metadata = sealed.metadata(data_key)
        finally:
            zeroize(data_key)
        unsealed = time.perf_counter()

        step = "tls-identity"
        tls = take_tls_identity(metadata, now=utc_now())

        step = "state-store"
        store = open_state_store(config, metadata, store_factory)

        step = "model-load"
        extras = SealedExtras.take(tensors, metadata, config.model_id)
        handler = load_handler(config.handler, tensors, metadata)
        attach_text_watermark(config, handler, extras)
        handler = protect_weights(config.protection.weights_policy, handler)
        del tensors  # dynamic: the selected tensors' plaintext is overwritten; nothing else refers to it
        with subject_scope(WARM_UP_SUBJECT):  # a per-subject text mark needs a subject; its tokens go nowhere
            handler.warm_up()
        outputs = OutputGuard.for_handler(config.protection, extras, handler, store=store)
        loaded = time.perf_counter()
    except BootFailure:  # already one (the host services' fetch): passed on as is, not wrapped again
        raise
    except KeyAccessDeniedError as err:
        raise BootFailure(step, f"KMS denied the key: {err.code}") from err
    except KmsTlsError as err:
        raise BootFailure(step, "TLS to KMS failed verification: the endpoint's certificate is not from "
                                "the measured CA bundle or not for the KMS host name") from err
    except KeyReleaseError as err:
        raise BootFailure(step, f"key release failed: {type(err).__name__} {err.code or ''}".strip()) from err
    except KeyCommitmentError as err:
        raise BootFailure(step, "the released key is not the sealed model's key (key commitment "
                                "mismatch): refusing the file") from err
    except SealedModelError as err:
        raise BootFailure(step, "sealed model is invalid or was tampered with") from err
    except (TlsIdentityError, StateStoreError, WeightsSelectionError) as err:  # their messages name no secret
        raise BootFailure(step, str(err)) from err
    except (ConfigError, NitrovaultError) as err:
        raise BootFailure(step, f"{type(err).__name__}") from err
    except OSError as err:
        raise BootFailure(step, f"I/O error ({type(err).__name__})") from err

    timings = BootTimings(
        fetch_s=fetched - started,
        attestation_s=release.attestation_s,
        kms_s=release.kms_s,
        unseal_s=unsealed - unseal_started,
        model_load_s=loaded - unsealed,
        total_s=loaded - started,
    )
    return BootResult(handler=handler, sealed_digest=sealed.header.digest.hex(), timings=timings,
                      outputs=outputs, tls=tls, store=store)


def open_state_store(config: EnclaveConfig, metadata: dict[str, str],
                     factory: StoreFactory | None) -> StateStore | None:
    """The shared state store of the measured config, authenticated with the sealed password (removed
    from ``metadata``: the handler never sees it). ``None`` when the config names no store."""
    password = metadata.pop(STATE_STORE_PASSWORD_KEY, None)
    if config.state_store is None:
        return None
    if password is None:
        raise StateStoreError("the measured config names a state store but the sealed model carries no "
                              "credential for it (seal it with --state-store-password-file)")
    if factory is None:
        raise StateStoreError("the measured config names a state store but this enclave has no route to it")
    store = factory(password)
    try:
        store.ping()
    except StateStoreCredentialError:
        store.close()
        raise
    except StateStoreError as err:
        log.warning("%s at boot: protected calls get UNAVAILABLE until it answers", err)
    return store


def take_tls_identity(metadata: dict[str, str], *, now: datetime) -> TlsIdentity:
    """Remove the sealed TLS identity from ``metadata`` (the handler never sees the key) and check it is
    usable at ``now``; :class:`TlsIdentityError` (a message naming no secret) otherwise."""
    identity = TlsIdentity.from_sealed_metadata(metadata)
    metadata.pop(SEALED_KEY, None)
    metadata.pop(SEALED_CHAIN, None)
    if identity is None:
        raise TlsIdentityError("the sealed model carries no TLS identity (seal it with one)")
    if not identity.valid_at(now):
        raise TlsIdentityError("the sealed TLS certificate is outside its validity period")
    return identity


def attach_text_watermark(config: EnclaveConfig, handler: ModelHandler, extras: SealedExtras) -> None:
    """Add the green-list processor to a language model's generation when the policy asks for it (per
    subject: keyed by each call's subject, :mod:`enclave_app.models.green_list`)."""
    text = config.protection.text_mark
    if text is None:
        return
    processors = getattr(handler, "logits_processors", None)
    vocab_size = getattr(handler, "vocab_size", None)
    if not isinstance(processors, list) or not isinstance(vocab_size, int):
        raise ModelLoadError("the policy asks for a text watermark but the model does not generate text")
    if extras.watermark_keys is None:
        raise ModelLoadError("the policy asks for a text watermark; the sealed model has no watermark secret")
    processors.append(GreenListProcessor(extras.watermark_keys, float(text["gamma"]), float(text["delta"]),
                                         vocab_size=vocab_size,
                                         per_subject=config.protection.text_per_subject))

