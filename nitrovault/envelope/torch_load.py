"""Unseal straight into torch tensors (the only envelope module that imports torch).

Invariants:

* Plaintext never touches disk: chunks are decrypted (on up to 4 threads, one contiguous slice each)
  into preallocated ``torch.uint8`` buffers and the tensors are zero-copy views of them
  (``buffer[begin:end].view(dtype).reshape(shape)``).
* Loading all tensors allocates one buffer of ``payload_size`` bytes (an anonymous mmap advised for
  transparent huge pages when large). Loading a subset allocates one
  buffer per run of consecutive chunks the requested tensors touch, and decrypts only those chunks.
* A tensor whose payload offset is not a multiple of its element size (possible in a hand-made
  safetensors file, never in one written by the safetensors library) is copied into an aligned tensor.
* On any failure every buffer is zeroed before :class:`SealedModelError` propagates, so unauthenticated
  or partial plaintext is not left in memory for a caller to misuse.

dtype mapping (safetensors -> torch): BOOL->bool, U8->uint8, I8->int8, I16->int16, U16->uint16,
I32->int32, U32->uint32, I64->int64, U64->uint64, F16->float16, BF16->bfloat16, F32->float32,
F64->float64, F8_E4M3->float8_e4m3fn, F8_E5M2->float8_e5m2. Bytes are little-endian, as safetensors
specifies; torch on x86-64 and arm64 is little-endian too.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from nitrovault.envelope.format import TensorInfo

if TYPE_CHECKING:
    from nitrovault.envelope.stream import SealedModel

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


#: threads decrypting one run of chunks (AES-GCM releases the GIL; see ``Unsealer.open_chunks_into``)
_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: buffers this large come from an anonymous mmap with MADV_HUGEPAGE (see :func:`_alloc`)
_HUGE_MIN = 2 << 20


def _alloc(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer. Large ones are anonymous mmaps advised for transparent huge
    pages: first-touch page faults, not AES, bound a full load (measured ~2x faster on a VM with THP
    in ``madvise`` mode); ``torch.frombuffer`` keeps the mapping alive as long as any view of it."""
    if nbytes < _HUGE_MIN:
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # not every kernel or platform has THP
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)


def _runs(model: SealedModel, infos: Iterable[TensorInfo]) -> list[range]:
    """Maximal runs of consecutive global chunk indices touched by ``infos``."""
    needed = sorted({i for t in infos for i in model.header.payload_chunk_range(*t.offsets)})
    runs: list[range] = []
    for i in needed:
        if runs and runs[-1].stop == i:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


def _view(buffer: torch.Tensor, start: int, info: TensorInfo) -> torch.Tensor:
    dtype = TORCH_DTYPES[info.dtype]
    raw = buffer[start : start + info.nbytes]
    if start % dtype.itemsize:
        raw = raw.clone()  # misaligned in the payload: one copy into a fresh, aligned tensor
    return raw.view(dtype).reshape(info.shape)


def load_tensors(
    model: SealedModel, data_key: bytes | bytearray, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """See :meth:`SealedModel.load_tensors`. Unknown ``names`` raise KeyError (name not echoed)."""
    header = model.header
    buffers: list[torch.Tensor] = []
    try:
        with model.unsealer(data_key) as u:
            index, _ = u.tensor_index()
            if names is None:
                wanted = index
            else:
                wanted = {}
                for name in names:
                    if name not in index:
                        raise KeyError("requested tensor is not in the sealed model")
                    wanted[name] = index[name]
            placed: list[tuple[range, int, torch.Tensor]] = []  # (run, payload offset, buffer)
            for run in _runs(model, wanted.values()):
                begin = (run.start - header.metadata_chunks) * header.chunk_size
                end = min(header.payload_size, (run.stop - header.metadata_chunks) * header.chunk_size)
                buf = _alloc(end - begin)
                buffers.append(buf)
                u.open_chunks_into(run, buf.numpy().data, workers=_WORKERS)
                placed.append((run, begin, buf))
            out: dict[str, torch.Tensor] = {}
            for name, info in wanted.items():
                if info.nbytes == 0:
                    out[name] = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
                    continue
                first = header.payload_chunk_range(*info.offsets).start
                _, begin, buf = next(p for p in placed if first in p[0])
                out[name] = _view(buf, info.offsets[0] - begin, info)
            return out
    except BaseException:
        for buf in buffers:
            buf.zero_()
        raise
