"""Where the local stack keeps what, by who would hold it in production.

A local home plays three parties on one machine, and each gets its own folder (0700), so that the
parent process is only ever handed paths under ``HOME/parent``:

``HOME/owner``
    The model owner's machine: the plain model (``plain/``), the token issuer's keys (``issuer/``), the
    watermark secret, the owner's IAM credentials' record of the key ARN, the seal records, and what the
    owner publishes to clients and reviewers (the measured enclave config, the PCR manifest, the sealed
    TLS certificate, the demo token).
``HOME/aws``
    What AWS holds: the fake Nitro PKI (its root key signs every attestation document), the KMS
    emulator's state and its TLS CA (the stand-in for Amazon Trust Services), the IAM principals.
``HOME/parent``
    What the EC2 parent instance holds: its config, the instance role's credentials, the sealed model
    (ciphertext) and the enclave's audit log as shipped to the parent.

``HOME/logs`` holds every process's log. Unix sockets live under ``/tmp/nitrovault-<tag>`` (their paths
must stay short); the local NSM's socket is an abstract one inside the enclave's network namespace, so
it is in no folder at all (``nitrovault.local.nsm_service``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nitrovault.errors import NitrovaultError
from nitrovault.files import write_private

ACCOUNT = "111122223333"
REGION = "us-east-1"
ROLES = {
    "admin": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-key-admin",
    "sealer": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-sealer",
    "enclave": f"arn:aws:iam::{ACCOUNT}:role/nitrovault-enclave-host",
}


class StackError(NitrovaultError):
    """A local stack step failed; ``step`` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class Paths:
    home: Path

    def __getattr__(self, name: str) -> Path:  # pragma: no cover - attribute typo guard
        raise AttributeError(name)

    # -- the three parties ------------------------------------------------------------------------------

    @property
    def owner(self) -> Path:
        return self.home / "owner"

    @property
    def aws(self) -> Path:
        return self.home / "aws"

    @property
    def parent(self) -> Path:
        return self.home / "parent"

    def make(self) -> None:
        """Create the home and its three parties' folders, each 0700."""
        for folder in (self.home, self.owner, self.aws, self.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    # -- AWS ------------------------------------------------------------------------------------------

    @property
    def pki(self) -> Path:
        """The fake Nitro PKI (root key included): only the local NSM service reads it."""
        return self.aws / "pki"

    @property
    def kms_state(self) -> Path:
        return self.aws / "kms"

    @property
    def kms_tls(self) -> Path:
        """The KMS emulator's TLS CA and server certificate (``nitrovault.local.kms.tls``)."""
        return self.aws / "kms-tls"

    @property
    def principals(self) -> Path:
        """Every IAM principal's access key (the stack is IAM too); the emulator's view is derived."""
        return self.aws / "principals.json"

    @property
    def kms_principals(self) -> Path:
        return self.aws / "kms-principals.json"

    @property
    def state_store(self) -> Path:
        """The shared state store's server files: TLS, the ACL (a password hash only), its data."""
        return self.aws / "state-store"

    # -- the owner ------------------------------------------------------------------------------------

    @property
    def key(self) -> Path:
        return self.owner / "key.json"

    @property
    def issuer(self) -> Path:
        """The local token issuer's keys (``nitrovault token issue --keys-dir HOME/owner/issuer``)."""
        return self.owner / "issuer"

    @property
    def demo_token(self) -> Path:
        return self.owner / "demo.token"

    @property
    def owner_watermark_key(self) -> Path:
        """The model owner's watermark secret (32 random bytes, hex, 0600), sealed into the demo model."""
        return self.owner / "owner-watermark.key"

    @property
    def owner_harden_key(self) -> Path:
        """The model owner's hardening master key (32 random bytes, hex, 0600): each copy's secret is
        derived from it (``nitrovault harden --secret``, ``nitrovault fingerprint identify --key-file``)."""
        return self.owner / "owner-harden.key"

    @property
    def fingerprint_registry(self) -> Path:
        """The owner's registry of hardened copies (``nitrovault fingerprint identify --registry``)."""
        return self.owner / "fingerprints.json"

    @property
    def state_store_password(self) -> Path:
        """The state store user's password (0600): sealed with the model, never under ``HOME/parent``."""
        return self.owner / "state-store.password"

    @property
    def plain(self) -> Path:
        """Plaintext models made by the stack (0700; the demo's file holds the owner's watermark secret)."""
        return self.owner / "plain"

    @property
    def lm_cache(self) -> Path:
        """The demo LM's builds (``nitrovault.local.tiny_lm.ensure_tiny_lm``): trained once, reused."""
        return self.owner / "lm"

    def seal_record(self, model_id: str) -> Path:
        """What the sealed model was made from (plain file SHA-256, key, context): reuse it or reseal."""
        return self.owner / "seals" / f"{model_id}.sealed.json"

    @property
    def enclave_config(self) -> Path:
        """The measured enclave config (what the image bakes in; public, reviewed)."""
        return self.owner / "enclave.json"

    @property
    def enclave_cert(self) -> Path:
        """The certificate of the TLS identity sealed with the model (public; what clients pin)."""
        return self.owner / "enclave-cert.pem"

    @property
    def pcr_manifest(self) -> Path:
        """The measured PCRs in the image build's ``pcr-manifest.json`` format (for ``--pcr-manifest``)."""
        return self.owner / "pcr-manifest.json"

    # -- the parent -----------------------------------------------------------------------------------

    @property
    def parent_config(self) -> Path:
        return self.parent / "parent.json"

    @property
    def image_config(self) -> Path:
        """The measured config as part of the enclave image the parent is given to run (the local EIF)."""
        return self.parent / "image" / "enclave.json"

    @property
    def parent_credentials(self) -> Path:
        """The instance role's credentials, as the parent gets them from instance metadata."""
        return self.parent / "enclave-credentials.json"

    @property
    def models(self) -> Path:
        """The parent's model store: sealed files only (ciphertext)."""
        return self.parent / "models"

    def sealed(self, model_id: str) -> Path:
        """The sealed model the parent hands to the enclave (the parent's directory store reads it)."""
        return self.models / f"{model_id}.sealed"

    @property
    def audit(self) -> Path:
        """The parent stores the enclave's audit log here, one folder per enclave boot."""
        return self.parent / "audit"

    # -- shared ---------------------------------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        """Sockets live under /tmp, named after the home folder: unix socket paths must stay short."""
        return Path(tempfile.gettempdir()) / f"nitrovault-{self.tag}"

    @property
    def tag(self) -> str:
        """Twelve hex digits naming this home (socket folders, the NSM's abstract socket)."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]


def free_port() -> int:
    """A loopback TCP port the OS just handed out (for stacks started side by side: tests, benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_principals(path: Path) -> dict[str, dict[str, str]]:
    """``{"admin": {"akid", "secret", "arn"}, ...}``; the emulator's principals file is derived from it."""
    if path.is_file():
        data: dict[str, dict[str, str]] = json.loads(path.read_text())
        if set(data) == set(ROLES):
            return data
    data = {
        role: {"akid": "AKIA" + secrets.token_hex(8).upper(), "secret": secrets.token_urlsafe(30), "arn": arn}
        for role, arn in ROLES.items()
    }
    write_private(path, json.dumps(data, indent=2))
    return data
