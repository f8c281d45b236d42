"""Tensors on the wire (``nitrovault.v1.Tensor``) to and from numpy arrays, with validation.

Pure and shared by the enclave and the client. Incoming tensors are validated before any buffer is
interpreted: known dtype, non-negative shape, element count within the caller's limit, and
``len(data) == prod(shape) * itemsize`` exactly. bfloat16 has no numpy dtype: it travels as raw
little-endian 16-bit words, which :func:`to_numpy` returns as ``uint16`` with ``bfloat16=True`` so
torch can reinterpret them without a copy.

>>> import numpy as np
>>> t = from_numpy("x", np.arange(6, dtype=np.float32).reshape(2, 3))
>>> to_numpy(t, max_elements=100).array.shape
(2, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from nitrovault.errors import NitrovaultError
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb


class TensorFormatError(NitrovaultError):
    """A wire tensor is malformed (unknown dtype, bad shape, size mismatch, too large)."""

    step = "tensor"


_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT16: np.dtype("<i2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_BOOL: np.dtype("?"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}
_WIRE = {v.str if k != pb.DTYPE_BFLOAT16 else "": k for k, v in _NUMPY.items()}


@dataclass(frozen=True)
class WireArray:
    name: str
    array: np.ndarray
    #: ``array`` holds raw bfloat16 words (uint16)
    bfloat16: bool = False


def to_numpy(tensor: pb.Tensor, *, max_elements: int) -> WireArray:
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorFormatError(f"tensor {tensor.name!r}: unknown dtype {tensor.dtype}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"tensor {tensor.name!r}: negative dimension")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorFormatError(
            f"tensor {tensor.name!r}: {count} elements exceed the limit of {max_elements}"
        )
    if len(tensor.data) != count * dtype.itemsize:
        raise TensorFormatError(f"tensor {tensor.name!r}: data size does not match dtype and shape")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype == np.dtype("?") and array.size and not np.isin(array.view(np.uint8), (0, 1)).all():
        raise TensorFormatError(f"tensor {tensor.name!r}: bool elements must be 0 or 1")
    return WireArray(tensor.name, array, bfloat16=tensor.dtype == pb.DTYPE_BFLOAT16)


def from_numpy(name: str, array: np.ndarray, *, bfloat16: bool = False) -> pb.Tensor:
    array = np.ascontiguousarray(array)
    wire: Any  # a DType value; the generated stubs type the enum's members loosely
    if bfloat16:
        if array.dtype != np.uint16:
            raise TensorFormatError("bfloat16 tensors are passed as their raw uint16 words")
        wire = pb.DTYPE_BFLOAT16
    else:
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        wire = _WIRE.get(np.dtype(little).str, 0)
        if wire == 0:
            raise TensorFormatError(f"dtype {array.dtype} cannot travel on the wire")
        array = array.astype(little, copy=False)
    return pb.Tensor(name=name, dtype=wire, shape=list(array.shape), data=array.tobytes())
