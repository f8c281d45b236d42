"""Key encoding for the local stand-ins' key files (written with :func:`nitrovault.files.write_atomic`)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An EC private key as unencrypted PKCS#8 PEM (the stand-ins' keys are protected by file mode)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
