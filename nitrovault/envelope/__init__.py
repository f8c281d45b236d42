"""The sealed model format: safetensors weights under a chunked AEAD (spec: ``docs/sealed-format.md``).

* :mod:`.format` is pure (header, KDF, nonces, tensor index); :mod:`.stream` does file I/O;
  :mod:`.torch_load` decrypts into torch tensors and is imported only when tensors are loaded.
* Every authentication or format failure is :class:`nitrovault.errors.SealedModelError`, one message;
  a data key the (version-2) header does not commit to is its subclass ``KeyCommitmentError``, raised
  before any chunk is decrypted, and version-1 files are ``LegacySealedFormatError`` unless opted in.

Example::

    from nitrovault.envelope import SealedModel, seal_file, zeroize
    header = seal_file(src, dst, data_key=key, wrapped_key=blob, key_id=kid,
                       encryption_context={"model": "m"})
    model = SealedModel.open(dst)
    model.verify_key(key)            # key commitment, before anything is decrypted
    tensors = model.load_tensors(key)
    zeroize(key)  # key is a bytearray
"""

from nitrovault.envelope.format import (
    DEFAULT_CHUNK_SIZE,
    LEGACY_VERSION,
    MAGIC,
    VERSION,
    SealedHeader,
    TensorInfo,
)
from nitrovault.envelope.stream import SealedModel, seal_file, zeroize

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LEGACY_VERSION",
    "MAGIC",
    "VERSION",
    "SealedHeader",
    "SealedModel",
    "TensorInfo",
    "seal_file",
    "zeroize",
]
