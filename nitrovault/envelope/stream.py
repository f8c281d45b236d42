"""Sealing and unsealing files: the thin I/O shell around :mod:`nitrovault.envelope.format`.

Invariants:

* Bounded memory: sealing holds two chunk buffers (plaintext in, ciphertext out) and the tensor index,
  never the model. Unsealing reads with ``readinto`` into one reusable buffer and decrypts with
  ``AESGCM.decrypt_into`` straight into the caller's memory (cryptography >= 45 has the ``*_into``
  methods), so each payload byte is copied once by the kernel and written once by AES-GCM.
* ``seal_file`` writes a temporary file beside ``dst`` and renames it only on success: on any failure
  nothing is left at ``dst`` and the temporary file is removed.
* Every failure to open or authenticate a sealed file is :class:`SealedModelError` with one message.
  Plaintext handed out before the end of :meth:`SealedModel.iter_plaintext` is authenticated chunk by
  chunk; only a clean end of the iteration proves the stream was not truncated.
* The header digest captured by :meth:`SealedModel.open` is the AAD of every later read, so swapping
  the file underneath an open ``SealedModel`` fails authentication.

Example::

    header = seal_file(Path("m.safetensors"), Path("m.sealed"), data_key=key, wrapped_key=blob,
                       key_id="alias/models", encryption_context={"model": "m", "version": "1"})
    model = SealedModel.open(Path("m.sealed"))
    tensors = model.load_tensors(key)
    zeroize(key)
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from nitrovault.envelope.format import (
    DATA_KEY_LEN,
    LEGACY_VERSION,
    NONCE_PREFIX_LEN,
    PREFIX_LEN,
    SALT_LEN,
    TAG_LEN,
    VERSION,
    ChunkCipher,
    SealedHeader,
    TensorInfo,
    check_commitment,
    decode_header,
    decode_metadata,
    encode_metadata,
    header_length_from_prefix,
    parse_safetensors_header,
)
from nitrovault.errors import ConfigError, LegacySealedFormatError, SealedModelError

if TYPE_CHECKING:
    import torch

#: safetensors files start with a u64 LE header length; cap it like the safetensors library (100 MB)
_MAX_SAFETENSORS_HEADER = 100_000_000


def zeroize(buf: bytearray) -> None:
    """Overwrite ``buf`` with zeros in place (best effort: Python may hold other copies)."""
    memoryview(buf)[:] = bytes(len(buf))


#: a worker thread of a parallel unseal gets at least this many chunks (threads cost ~50-100 µs each)
_MIN_CHUNKS_PER_WORKER = 8


def _read_exact(f: IO[bytes], out: memoryview) -> None:
    """Fill ``out`` from ``f`` with ``readinto`` (raw files may return short reads); EOF raises EOFError."""
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])  # type: ignore[attr-defined]
        if not n:
            raise EOFError
        got += n


def _open_chunk_into(cipher: ChunkCipher, index: int, sealed: memoryview, out: memoryview) -> None:
    """Decrypt one chunk. Every decryption goes through here (tests spy on it to count chunks)."""
    cipher.open_into(index, sealed, out)


# -- sealing ---------------------------------------------------------------------------------------------


def _read_safetensors_header(f: IO[bytes], file_size: int) -> tuple[dict[str, TensorInfo], Any, int]:
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ConfigError("not a safetensors file: too short")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(_MAX_SAFETENSORS_HEADER, file_size - 8):
        raise ConfigError("not a safetensors file: bad header length")
    start = 8 + n
    tensors, extra = parse_safetensors_header(f.read(n), file_size - start)
    return tensors, extra, start


def seal_file(
    src: Path,
    dst: Path,
    *,
    data_key: bytes | bytearray,
    wrapped_key: bytes,
    key_id: str,
    encryption_context: Mapping[str, str],
    chunk_size: int = 1 << 20,
    progress: Callable[[int], None] | None = None,
    rng: Callable[[int], bytes] = os.urandom,
    version: int = VERSION,
) -> SealedHeader:
    """Seal the safetensors file ``src`` into ``dst``; returns the header (``.digest`` names the result).

    ``progress`` is called with the number of payload bytes sealed since the last call.
    Raises ConfigError for a bad input file or parameters; I/O errors propagate as OSError.
    """
    if len(data_key) != DATA_KEY_LEN:
        raise ConfigError("data key must be 32 bytes")
    src, dst = Path(src), Path(dst)
    with open(src, "rb", buffering=0) as fin:
        file_size = os.fstat(fin.fileno()).st_size
        tensors, extra, data_start = _read_safetensors_header(fin, file_size)
        payload_size = file_size - data_start
        metadata = encode_metadata(tensors, extra, chunk_size)
        header = SealedHeader.build(
            key_id=key_id,
            encryption_context=encryption_context,
            wrapped_key=bytes(wrapped_key),
            chunk_size=chunk_size,
            metadata_chunks=len(metadata) // chunk_size,
            payload_size=payload_size,
            salt=rng(SALT_LEN),
            nonce_prefix=rng(NONCE_PREFIX_LEN),
            data_key=data_key,
            version=version,
        )
        cipher = ChunkCipher.for_header(header, data_key)
        fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb", buffering=0) as fout:
                _write_all(fout, header.raw)
                _seal_stream(cipher, fin, fout, metadata, header, progress)
                fout.flush()
                os.fsync(fout.fileno())
            if os.fstat(fin.fileno()).st_size != file_size:
                raise ConfigError("input file changed while sealing")
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    return header


def _write_all(f: IO[bytes], data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n:]


def _seal_stream(
    cipher: ChunkCipher,
    fin: IO[bytes],
    fout: IO[bytes],
    metadata: bytes,
    header: SealedHeader,
    progress: Callable[[int], None] | None,
) -> None:
    cs = header.chunk_size
    inbuf, outbuf = bytearray(cs), bytearray(cs + TAG_LEN)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    meta = memoryview(metadata)
    for i in range(header.metadata_chunks):
        cipher.seal_into(i, meta[i * cs : (i + 1) * cs], outview)
        _write_all(fout, outview)
    for i in range(header.metadata_chunks, header.chunk_count):
        n = header.chunk_plain_len(i)
        try:
            _read_exact(fin, inview[:n])
        except EOFError:
            raise ConfigError("input file changed while sealing") from None
        cipher.seal_into(i, inview[:n], outview[: n + TAG_LEN])
        _write_all(fout, outview[: n + TAG_LEN])
        if progress is not None:
            progress(n)
    zeroize(inbuf)


# -- unsealing -------------------------------------------------------------------------------------------


class Unsealer:
    """An open sealed file plus the chunk cipher for one data key (use as a context manager).

    Low-level: :class:`SealedModel` and :mod:`nitrovault.envelope.torch_load` build on it.
    """

    def __init__(self, path: Path, header: SealedHeader, data_key: bytes | bytearray) -> None:
        self.header = header
        self.cipher = ChunkCipher.for_header(header, data_key)
        self._file: io.FileIO = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        try:
            _check_file(self._file, header)
        except BaseException:
            self._file.close()
            raise
        self._buf = bytearray(header.chunk_size + TAG_LEN)
        self._view = memoryview(self._buf)

    def __enter__(self) -> Unsealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def open_chunks_into(self, indices: range, out: memoryview, *, workers: int = 1) -> None:
        """Decrypt the consecutive chunks ``indices`` into ``out`` (exactly their plaintext length).

        With ``workers > 1`` the range is cut into that many contiguous slices, each read with
        ``os.preadv`` (no shared file offset) and decrypted on its own thread: AES-GCM in
        ``cryptography`` releases the GIL, so slices decrypt in parallel (measured 1.76x with 2 threads on
        2 cores). Every chunk is still authenticated; the first failure is raised after all threads end.
        """
        if not indices:
            return
        total = sum(self.header.chunk_plain_len(i) for i in indices)
        if total != len(out):
            raise ValueError("output buffer does not match the chunk range")
        workers = max(1, min(workers, len(indices) // _MIN_CHUNKS_PER_WORKER))
        if workers == 1:
            self._open_run(indices, out, self._view)
            return
        step = -(-len(indices) // workers)
        slices = [indices[k : k + step] for k in range(0, len(indices), step)]
        # every chunk but the last is chunk_size long, so a slice starts where its first chunk does
        first = indices.start
        errors: list[BaseException] = []

        def run(part: range) -> None:
            scratch = memoryview(bytearray(self.header.chunk_size + TAG_LEN))
            begin = (part.start - first) * self.header.chunk_size
            end = len(out) if part.stop == indices.stop else (part.stop - first) * self.header.chunk_size
            try:
                self._open_run(part, out[begin:end], scratch)
            except BaseException as err:  # re-raised by the caller's thread
                errors.append(err)

        threads = [threading.Thread(target=run, args=(part,), name="unseal") for part in slices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if isinstance(e, SealedModelError)), errors[0])

    def _open_run(self, indices: range, out: memoryview, scratch: memoryview) -> None:
        """Read and decrypt consecutive chunks with positional reads (safe from several threads)."""
        fd = self._file.fileno()
        offset = self.header.chunk_offset(indices.start)
        pos = 0
        for i in indices:
            n = self.header.chunk_plain_len(i)
            sealed = scratch[: n + TAG_LEN]
            got = 0
            while got < len(sealed):
                k = os.preadv(fd, [sealed[got:]], offset + got)
                if k <= 0:
                    raise SealedModelError()
                got += k
            _open_chunk_into(self.cipher, i, sealed, out[pos : pos + n])
            offset += n + TAG_LEN
            pos += n

    def tensor_index(self) -> tuple[dict[str, TensorInfo], Any]:
        h = self.header
        meta = bytearray(h.metadata_chunks * h.chunk_size)
        self.open_chunks_into(range(h.metadata_chunks), memoryview(meta))
        return decode_metadata(meta, h.payload_size)

    def iter_payload(self) -> Iterator[bytes]:
        h = self.header
        out = bytearray(h.chunk_size)
        view = memoryview(out)
        for i in range(h.metadata_chunks, h.chunk_count):
            n = h.chunk_plain_len(i)
            self.open_chunks_into(range(i, i + 1), view[:n])
            yield bytes(view[:n])
        zeroize(out)


def _check_file(f: io.FileIO, header: SealedHeader) -> None:
    """The file must still start with exactly this header and have exactly the implied length."""
    if os.fstat(f.fileno()).st_size != header.sealed_size:
        raise SealedModelError()
    f.seek(0)
    head = f.read(header.header_length)
    if head != header.raw:
        raise SealedModelError()


@dataclass(frozen=True)
class SealedModel:
    """A sealed model on disk whose header has been read (nothing decrypted yet)."""

    path: Path
    header: SealedHeader

    @classmethod
    def open(cls, path: Path | str, *, allow_legacy_v1: bool = False) -> SealedModel:
        """Read and check the plain header and the file length (no key needed). A version-1 file is not
        key-committing: :class:`LegacySealedFormatError` unless ``allow_legacy_v1`` (inspection,
        migration)."""
        path = Path(path)
        with open(path, "rb", buffering=0) as f:
            prefix = f.read(PREFIX_LEN)
            length = header_length_from_prefix(prefix)
            rest = f.read(length - PREFIX_LEN)
            header = decode_header(prefix + rest)
            if os.fstat(f.fileno()).st_size != header.sealed_size:
                raise SealedModelError()
        if header.version == LEGACY_VERSION and not allow_legacy_v1:
            raise LegacySealedFormatError()
        return cls(path, header)

    def verify_key(self, data_key: bytes | bytearray) -> None:
        """Check, in constant time and before anything is decrypted, that the header commits to
        ``data_key``; :class:`~nitrovault.errors.KeyCommitmentError` otherwise. Every decrypting method
        checks it too (through the chunk cipher)."""
        check_commitment(self.header, data_key)

    def unsealer(self, data_key: bytes | bytearray) -> Unsealer:
        return Unsealer(self.path, self.header, data_key)

    def tensor_index(self, data_key: bytes | bytearray) -> dict[str, TensorInfo]:
        """Decrypt only the metadata chunks: tensor name -> dtype, shape, payload byte range."""
        with self.unsealer(data_key) as u:
            return u.tensor_index()[0]

    def metadata(self, data_key: bytes | bytearray) -> dict[str, str]:
        """The safetensors ``__metadata__`` sealed with the model (encrypted like the tensor index).

        The local stack carries the architecture config and the tokenizer here, so neither is in the image.
        Anything but a string-to-string map is the opaque failure.
        """
        with self.unsealer(data_key) as u:
            extra = u.tensor_index()[1]
        if extra is None:
            return {}
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise SealedModelError()
        return dict(extra)

    def iter_plaintext(self, data_key: bytes | bytearray) -> Iterator[bytes]:
        """The payload (the safetensors data region), one authenticated chunk at a time."""
        with self.unsealer(data_key) as u:
            yield from u.iter_payload()

    def load_tensors(
        self, data_key: bytes | bytearray, names: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Decrypt straight into torch tensors (all, or only ``names``: then only their chunks)."""
        from nitrovault.envelope.torch_load import load_tensors

        return load_tensors(self, data_key, names)
