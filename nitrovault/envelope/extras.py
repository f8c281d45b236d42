"""Add what the enclave needs besides the weights to a plaintext safetensors file, before sealing.

The sealed format encrypts the whole safetensors file (header and metadata included), so anything put
here is released only with the model key: the handler's architecture config and tokenizer, the owner's
watermark secret and candidate words (``nitrovault.watermark.*``), the extraction detector's reference
sample (tensor ``nitrovault.reference``). Names the enclave reads are listed in ``docs/sealed-format.md``.

Invariants:

* the tensor data of ``src`` is streamed, never loaded (models can be larger than memory);
* extra tensors are appended after the existing data, so the data section stays contiguous with no
  holes (the safetensors rule), and existing offsets do not change;
* ``__metadata__`` stays a map of strings to strings; an extra tensor may not replace a model tensor.

Written by hand because the ``safetensors`` library only writes whole in-memory dicts
(``save_file``), which would load every weight; the format itself is 8 bytes of header length, a JSON
header padded with spaces to 8-byte alignment, then the data.

Example::

    with_extras(Path("model.safetensors"), Path("ready.safetensors"),
                metadata={"nitrovault.watermark.secret": secret.hex()},
                tensors={"nitrovault.reference": x_train[:512]})
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nitrovault.errors import ConfigError

__all__ = [
    "REFERENCE_TENSOR",
    "STATE_STORE_PASSWORD_KEY",
    "WATERMARK_CANDIDATES_KEY",
    "WATERMARK_SECRET_KEY",
    "read_header",
    "with_extras",
]

#: sealed tensor holding the extraction detector's reference sample ([n, features] of natural inputs)
REFERENCE_TENSOR = "nitrovault.reference"
#: sealed metadata: the owner's watermark secret (hex, >= 32 bytes)
WATERMARK_SECRET_KEY = "nitrovault.watermark.secret"  # noqa: S105 - a metadata key name, not a secret
#: sealed metadata: the embedding mark's candidate words (a JSON list of strings)
WATERMARK_CANDIDATES_KEY = "nitrovault.watermark.candidates"
#: sealed metadata: the shared state store user's password (only attested enclaves can authenticate)
STATE_STORE_PASSWORD_KEY = "nitrovault.state_store.password"  # noqa: S105 - a metadata key name

#: numpy dtype -> safetensors dtype name (the dtypes extra tensors may have)
_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_MAX_HEADER = 100 << 20  # the safetensors limit


def read_header(src: Path) -> tuple[dict[str, Any], int, int]:
    """(header, data offset, data length) of ``src``; ConfigError when it is not a safetensors file."""
    size = src.stat().st_size
    with src.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ConfigError(f"{src.name} is not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ConfigError(f"{src.name} has a malformed safetensors header") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{src.name} has a malformed safetensors header")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    data_len = size - 8 - n
    if max(ends, default=0) != data_len:
        raise ConfigError(f"{src.name}: tensor data does not end where the file does")
    return header, 8 + n, data_len


def with_extras(src: Path, dst: Path, *, metadata: Mapping[str, str] | None = None,
                tensors: Mapping[str, np.ndarray] | None = None) -> None:
    """Copy ``src`` to ``dst`` with ``metadata`` merged into ``__metadata__`` and ``tensors`` appended."""
    header, data_at, data_len = read_header(src)
    merged = dict(header.get("__metadata__") or {})
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError("safetensors metadata maps strings to strings")
        merged[key] = value
    if merged:
        header["__metadata__"] = merged
    blobs: list[bytes] = []
    offset = data_len
    for name, array in (tensors or {}).items():
        if name == "__metadata__" or name in header:
            raise ConfigError(f"an extra tensor may not replace {name!r}")
        arr = np.ascontiguousarray(array)
        native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder != "|" else arr.dtype
        dtype = _DTYPES.get(native)
        if dtype is None:
            raise ConfigError(f"extra tensor {name!r} has an unsupported dtype {arr.dtype}")
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with src.open("rb") as f, dst.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little") + encoded)
        f.seek(data_at)
        shutil.copyfileobj(f, out, 1 << 20)
        for blob in blobs:
            out.write(blob)
