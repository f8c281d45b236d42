"""What the owner and the platform team do before an enclave starts, against the local stand-ins.

Each function is one job with its inputs explicit, the way the production tools do it against AWS:

* :func:`ensure_model_key` — the model key, created once (its ARN kept in ``HOME/owner/key.json``);
* :func:`model_policy` — its policy (:func:`nitrovault.policy.build.model_key_policy`): Decrypt only for
  an enclave with given PCRs and the model's encryption context;
* :func:`seal_model` — the plain safetensors file sealed under a data key from ``GenerateDataKey``, with a
  fresh TLS identity and the state store's password in its encrypted metadata; kept across runs while
  its record (key, context, weights digest, password digest) and its certificate are current;
* :func:`enclave_config` / :func:`measure` — the measured enclave config and the PCRs of the image that
  bakes it in (:mod:`nitrovault.local.measure`);
* :func:`bind_policy` — the key policy bound to those PCRs (the local equivalent of deploying an image);
* :func:`denied_to_other_pcr0` — the check that KMS refuses a document of another PCR0.

Nothing here starts a process or prints: :mod:`nitrovault.local.stack` runs these as its steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3

from enclave_app.config import EnclaveConfig
from nitrovault.clock import utc_now
from nitrovault.envelope import SealedModel, seal_file, zeroize
from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY
from nitrovault.errors import KeyAccessDeniedError
from nitrovault.files import write_private
from nitrovault.identity import TlsIdentity
from nitrovault.kms import KmsClient, Recipient, RecipientKey
from nitrovault.local.homes import ACCOUNT, REGION, ROLES, Paths, StackError
from nitrovault.local.measure import default_lock_file, measure_enclave
from nitrovault.local.models import LocalModel, plain_json, with_metadata
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest

__all__ = [
    "ALIAS",
    "LOCAL_CHECKPOINT_EVERY",
    "LOCAL_TIERS",
    "REPO_ROOT",
    "TLS_SERVER_NAME",
    "Sealed",
    "StoreEndpoint",
    "bind_policy",
    "denied_to_other_pcr0",
    "enclave_config",
    "ensure_model_key",
    "kms_client",
    "measure",
    "model_policy",
    "seal_model",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
ALIAS = "alias/nitrovault-demo"
#: the DNS name in the local enclave's self-signed certificate (the TLS server name clients ask for)
TLS_SERVER_NAME = "enclave.nitrovault.local"
#: a sealed model is re-sealed (with a new identity) when its certificate has less than this to run
TLS_RENEW_BEFORE = timedelta(days=30)
KMS_FORWARDER_PORT = 8443
#: quota tiers of the local enclave config: a generous default, and small ones the tests select by claim
LOCAL_TIERS: dict[str, dict[str, Any]] = {
    "default": {"rate_per_s": 500.0, "burst": 1000},
    "test-tiny": {"rate_per_s": 2.0, "burst": 1, "daily_requests": None, "daily_items": None},
    "test-daily": {"rate_per_s": 500.0, "burst": 1000, "daily_requests": 3, "daily_items": None},
    "test-race": {"rate_per_s": 500.0, "burst": 1000, "daily_requests": 10, "daily_items": None},
}
#: a signed audit checkpoint every this many records (small, so a short session shows several)
LOCAL_CHECKPOINT_EVERY = 10


@dataclass(frozen=True)
class StoreEndpoint:
    """What the measured config names of the shared state store: host name, CA, user."""

    host: str
    ca_pem: bytes
    username: str


@dataclass(frozen=True)
class Sealed:
    """A sealed model file: its digest (what the config pins), and whether the last seal was kept."""

    path: Path
    digest: str
    reused: bool
    tls_fingerprint: str = ""


def kms_client(endpoint: str, ca_bundle: Path, principal: dict[str, str]) -> Any:
    """A boto3 KMS client of the emulator as ``principal`` (``akid``/``secret``), over verified TLS."""
    return boto3.client("kms", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=principal["akid"], aws_secret_access_key=principal["secret"],
                        verify=str(ca_bundle))


def model_policy(model: LocalModel, pcrs: dict[int, bytes]) -> dict[str, Any]:
    """The key policy: Decrypt for an enclave with ``pcrs`` and the model's encryption context."""
    return model_key_policy(account_id=ACCOUNT, admin_arns=[ROLES["admin"]], sealer_arns=[ROLES["sealer"]],
                            enclave_role_arns=[ROLES["enclave"]], pcrs=pcrs,
                            encryption_context=model.encryption_context)


def ensure_model_key(admin: Any, paths: Paths, model: LocalModel) -> tuple[str, bool]:
    """The model key's ARN, and whether it was created now (bound at first to this code's PCRs)."""
    if paths.key.is_file():
        arn = str(json.loads(paths.key.read_text())["key_arn"])
        try:
            admin.describe_key(KeyId=arn)
        except admin.exceptions.NotFoundException:
            pass
        else:
            return arn, False
    initial = model_policy(model, measure_enclave(REPO_ROOT, default_lock_file(REPO_ROOT)).as_pcrs())
    arn = str(admin.create_key(Policy=json.dumps(initial),
                               Description="nitrovault demo model key")["KeyMetadata"]["Arn"])
    with contextlib.suppress(admin.exceptions.AlreadyExistsException):
        admin.create_alias(AliasName=ALIAS, TargetKeyId=arn)  # the ARN is what the config names
    admin.enable_key_rotation(KeyId=arn)
    write_private(paths.key, json.dumps({"key_arn": arn}))
    return arn, True


def _tls_cert_current(paths: Paths) -> bool:
    """Whether the sealed identity's certificate (``HOME/owner/enclave-cert.pem``) has a month left."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(paths.enclave_cert.read_bytes())
    except (OSError, ValueError):
        return False
    return leaf.not_valid_after_utc - utc_now() > TLS_RENEW_BEFORE


def seal_model(sealer: Any, paths: Paths, model: LocalModel, key_arn: str, store_password: str) -> Sealed:
    """Seal ``model`` for ``key_arn`` into ``HOME/parent/models`` (or keep the current seal)."""
    sealed_path = paths.sealed(model.model_id)
    record_path = paths.seal_record(model.model_id)
    context = model.encryption_context
    if not model.weights.is_file():
        raise StackError("seal", f"no model weights at {model.weights}")
    with model.weights.open("rb") as f:
        weights_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    record = {"weights_sha256": weights_sha256, "key_id": key_arn, "encryption_context": context,
              "state_store_password_sha256": hashlib.sha256(store_password.encode()).hexdigest()}
    if sealed_path.is_file() and record_path.is_file() and _tls_cert_current(paths):
        header = SealedModel.open(sealed_path).header
        try:
            same = json.loads(record_path.read_text()) == record
        except ValueError:
            same = False
        if same and header.key_id == key_arn and dict(header.encryption_context) == context:
            return Sealed(sealed_path, header.digest.hex(), reused=True)
    data_key = KmsClient(sealer).generate_data_key(key_arn, encryption_context=context)
    paths.models.mkdir(mode=0o700, parents=True, exist_ok=True)
    record_path.unlink(missing_ok=True)
    # A fresh identity per seal: its private key goes only into the sealed file's encrypted metadata
    # (through a private temporary plain copy, removed at once), never to a file of its own.
    identity = TlsIdentity.generate(TLS_SERVER_NAME, now=utc_now())
    staging = Path(tempfile.mkdtemp(prefix=".seal-", dir=paths.models))
    try:
        ready = staging / "ready.safetensors"
        with_metadata(model.weights, ready,
                      {**identity.sealed_metadata(), STATE_STORE_PASSWORD_KEY: store_password})
        assert isinstance(data_key.plaintext, bytearray)
        header = seal_file(ready, sealed_path, data_key=data_key.plaintext,
                           wrapped_key=data_key.ciphertext_blob, key_id=key_arn, encryption_context=context)
    finally:
        data_key.wipe()
        shutil.rmtree(staging, ignore_errors=True)
    write_private(paths.enclave_cert, identity.leaf_pem, mode=0o644)
    write_private(record_path, json.dumps(record, indent=2) + "\n")
    return Sealed(sealed_path, header.digest.hex(), reused=False, tls_fingerprint=identity.fingerprint)


def enclave_config(model: LocalModel, *, key_arn: str, sealed_digest: str, kms_ca: bytes, issuer: Path,
                   store: StoreEndpoint | None) -> bytes:
    """The measured enclave config (validated by :class:`EnclaveConfig`, so a bad section fails here)."""
    meta = json.loads((issuer / "issuer.json").read_text())
    config = EnclaveConfig.from_mapping({
        "model_id": model.model_id,
        "model_version": model.version,
        "handler": model.handler,
        "kms_key_arn": key_arn,
        "region": REGION,
        "encryption_context": model.encryption_context,
        "sealed_digest": sealed_digest,
        # the region's real KMS host name, over TLS, verified against the emulator's CA: reached the
        # production way, through the in-enclave forwarder and the parent
        "kms_ca_bundle": kms_ca.decode(),
        "kms_forwarder_port": KMS_FORWARDER_PORT,
        "access": {
            "issuer": meta["issuer"],
            "audience": meta["audience"],
            "jwks": json.loads((issuer / "jwks.json").read_text()),
            "tiers": plain_json(model.tiers) if model.tiers is not None else LOCAL_TIERS,
            "default_tier": "default",
        },
        "audit": {"checkpoint_every": LOCAL_CHECKPOINT_EVERY},
        **({"state_store": {"host": store.host, "ca_bundle": store.ca_pem.decode(),
                            "username": store.username}} if store is not None else {}),
        **({"protection": plain_json(model.protection)} if model.protection is not None else {}),
        **({"batching": plain_json(model.batching)} if model.batching is not None else {}),
    })
    return config.to_json().encode()


def measure(paths: Paths, config: bytes) -> dict[int, bytes]:
    """PCR0/1/2 of the enclave image baking ``config`` in; writes the config (the owner's published copy
    and the image handed to the parent) and ``HOME/owner/pcr-manifest.json``."""
    pcrs = measure_enclave(REPO_ROOT, default_lock_file(REPO_ROOT),
                           extra_files={"etc/nitrovault/enclave.json": config}).as_pcrs()
    write_private(paths.enclave_config, config, mode=0o644)
    write_private(paths.image_config, config, mode=0o644)
    write_private(paths.pcr_manifest, PcrManifest(pcrs={i: pcrs[i] for i in (0, 1, 2)}).dumps(), mode=0o644)
    return pcrs


def bind_policy(admin: Any, model: LocalModel, key_arn: str, pcrs: dict[int, bytes]) -> None:
    """Bind the key policy to ``pcrs`` (an enclave of other code can no longer obtain the key)."""
    admin.put_key_policy(KeyId=key_arn, PolicyName="default", Policy=json.dumps(model_policy(model, pcrs)))


def denied_to_other_pcr0(enclave_role: Any, pki: LocalPki, sealed: Path, key_arn: str,
                         pcrs: dict[int, bytes]) -> str:
    """KMS's error code for a document of another PCR0; a :class:`StackError` if it released the key."""
    other = dict(pcrs)
    other[0] = bytes(b ^ 0xFF for b in pcrs[0])
    key = RecipientKey.generate()
    document = Nsm(LocalNsmDevice(pki, pcrs=other)).attestation(public_key=key.public_key_der)
    header = SealedModel.open(sealed).header
    try:
        leaked = bytearray(KmsClient(enclave_role).decrypt(
            header.wrapped_key, key_id=key_arn, encryption_context=dict(header.encryption_context),
            recipient=Recipient(attestation_document=document, key=key)))
        zeroize(leaked)
    except KeyAccessDeniedError as err:
        return err.code
    raise StackError("deny check", "KMS released the key to an enclave with another PCR0")
