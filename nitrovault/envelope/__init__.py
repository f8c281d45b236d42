"""The sealed model format: safetensors weights under a chunked AEAD (spec: ``docs/sealed-format.md``).

* :mod:`.format` is pure (header, KDF, nonces, tensor index); :mod:`.stream` does file I/O;
  :mod:`.torch_load` decrypts into torch tensors and is imported only when tensors are loaded.
* Every authentication or format failure is :class:`nitrovault.errors.SealedModelError`, one message.

Example::

    from nitrovault.envelope import SealedModel, seal_file, zeroize
    header = seal_file(src, dst, data_key=key, wrapped_key=blob, key_id=kid,
                       encryption_context={"model": "m"})
    tensors = SealedModel.open(dst).load_tensors(key)
    zeroize(key)  # key is a bytearray
"""

from nitrovault.envelope.format import (
    DEFAULT_CHUNK_SIZE,
    MAGIC,
    VERSION,
    SealedHeader,
    TensorInfo,
)
from nitrovault.envelope.stream import SealedModel, seal_file, zeroize

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "VERSION",
    "SealedHeader",
    "SealedModel",
    "TensorInfo",
    "seal_file",
    "zeroize",
]
