"""Sealed format benchmarks (``python -m bench.run envelope``).

* ``unseal_vs_aesgcm``: payload throughput of ``SealedModel.load_tensors`` (read + authenticate +
  decrypt into torch buffers, on ``unseal_threads`` threads: AES-GCM releases the GIL) over raw
  AES-256-GCM ``decrypt_into`` of the same chunks on **one** thread, in memory, in the same chunk size,
  measured in the same run (best of a few). Target ratio >= 0.7. ``streaming_ratio`` is the one-thread
  path (``iter_payload``) against the same baseline: the per-core efficiency.
* ``sealed_load_vs_plain_load``: wall time of loading the sealed model into torch tensors (then reading
  one byte per page, so lazy mmaps are really loaded) over
  ``safetensors.torch.load_file`` of the plain file, each in a fresh subprocess (files warm in the page
  cache); peak RSS over the baseline after importing torch, and its ratio to the model size.
  Targets: time ratio <= 1.3, memory ratio <= 1.3.

The model (``NITROVAULT_BENCH_MODEL_MB`` MiB of F32 tensors, default 1024) is generated into a temporary
directory and removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nitrovault.envelope import SealedModel, seal_file
from nitrovault.envelope.format import TAG_LEN, ChunkCipher

REPO = Path(__file__).resolve().parents[1]


def torch_load_workers() -> int:
    from nitrovault.envelope import torch_load

    return torch_load._WORKERS
MiB = 1 << 20
TENSOR_MB = 64
REPEATS = 3


def write_model(path: Path, total_mb: int) -> int:
    """A safetensors file of F32 tensors (64 MiB each, plus a remainder) totalling ``total_mb`` MiB."""
    sizes = [TENSOR_MB * MiB] * (total_mb // TENSOR_MB)
    if total_mb % TENSOR_MB:
        sizes.append((total_mb % TENSOR_MB) * MiB)
    header: dict[str, Any] = {}
    pos = 0
    for i, n in enumerate(sizes):
        header[f"layers.{i}.weight"] = {
            "dtype": "F32",
            "shape": [n // 4096, 1024],
            "data_offsets": [pos, pos + n],
        }
        pos += n
    hjson = json.dumps(header).encode()
    hjson += b" " * (-len(hjson) % 8)
    block = os.urandom(TENSOR_MB * MiB)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)) + hjson)
        for n in sizes:
            f.write(memoryview(block)[:n])
    return pos


def _raw_aesgcm_mbps(sealed: SealedModel, data_key: bytes, max_chunks: int = 256) -> float:
    """AES-256-GCM decrypt_into of the model's own payload chunks, held in memory, one output buffer."""
    h = sealed.header
    cipher = ChunkCipher.for_header(h, data_key)
    first = h.metadata_chunks
    indices = range(first, min(h.chunk_count, first + max_chunks))
    with open(sealed.path, "rb") as f:
        f.seek(h.chunk_offset(first))
        chunks = [(i, f.read(h.chunk_plain_len(i) + TAG_LEN)) for i in indices]
    aead: AESGCM = cipher.aead
    out = memoryview(bytearray(h.chunk_size))
    nonces = [cipher.nonce(i) for i, _ in chunks]
    total = sum(len(c) - TAG_LEN for _, c in chunks)
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for nonce, (_, c) in zip(nonces, chunks, strict=True):
            aead.decrypt_into(nonce, c, cipher.aad, out[: len(c) - TAG_LEN])
        best = min(best, time.perf_counter() - t0)
    return total / best / 1e6


def _unseal_mbps(sealed: SealedModel, data_key: bytes) -> float:
    """``load_tensors``: read, authenticate and decrypt every chunk into fresh torch memory."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        tensors = sealed.load_tensors(data_key)
        best = min(best, time.perf_counter() - t0)
        del tensors
    return sealed.header.payload_size / best / 1e6


def _stream_mbps(sealed: SealedModel, data_key: bytes) -> float:
    """Read, authenticate and decrypt every chunk into one reused buffer (no fresh memory to fault in)."""
    h = sealed.header
    out = memoryview(bytearray(h.chunk_size))
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        with sealed.unsealer(data_key) as u:
            for i in range(h.metadata_chunks, h.chunk_count):
                u.open_chunks_into(range(i, i + 1), out[: h.chunk_plain_len(i)])
        best = min(best, time.perf_counter() - t0)
    return h.payload_size / best / 1e6


def _touch(tensors: dict[str, Any]) -> int:
    """Read one byte per 4 KiB page of every tensor, so lazily mapped data is really loaded."""
    import torch

    return sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum()) for t in tensors.values() if t.numel())


def _rss_exact() -> int:
    """Resident bytes from a page-table walk (smaps_rollup). ru_maxrss alone can lag: the kernel's RSS
    counters are batched per CPU, and a load made of a few huge-page faults may not show up in them."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(mode: str, path: str) -> None:
    """Runs in a fresh interpreter: load one way, print seconds and peak RSS over the torch baseline."""
    import safetensors.torch
    import torch

    with contextlib.suppress(OSError):  # forget the import's transient peak (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    base, base_exact = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _rss_exact()
    t0 = time.perf_counter()
    if mode in ("plain", "plain_copy"):
        tensors = safetensors.torch.load_file(path)
    else:
        key = bytearray.fromhex(sys.stdin.readline().strip())
        tensors = SealedModel.open(path).load_tensors(key)
    lazy = time.perf_counter() - t0
    if mode == "plain_copy":  # what holding the weights in the process's own memory costs
        tensors = {k: torch.empty_like(v).copy_(v) for k, v in tensors.items()}
    _touch(tensors)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    peak = max(peak, _rss_exact() - base_exact)
    print(json.dumps({"seconds": seconds, "untouched_seconds": lazy, "peak_rss_bytes": peak}))


def _measure(mode: str, path: Path, key: bytes) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_envelope", mode, str(path)],
        input=key.hex() + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        while f.readinto(buf):
            pass


def run() -> Iterator[dict[str, Any]]:
    total_mb = int(os.environ.get("NITROVAULT_BENCH_MODEL_MB", "1024"))
    key = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="nv-bench-") as tmp:
        plain, sealed_path = Path(tmp) / "model.safetensors", Path(tmp) / "model.sealed"
        payload = write_model(plain, total_mb)
        t0 = time.perf_counter()
        seal_file(
            plain, sealed_path, data_key=key, wrapped_key=b"bench", key_id="bench", encryption_context={}
        )
        seal_seconds = time.perf_counter() - t0
        sealed = SealedModel.open(sealed_path)
        _warm(sealed_path)
        raw = _raw_aesgcm_mbps(sealed, key)
        unseal = _unseal_mbps(sealed, key)
        streaming = _stream_mbps(sealed, key)
        yield {
            "name": "unseal_vs_aesgcm",
            "payload_mb": payload / MiB,
            "chunk_size": sealed.header.chunk_size,
            "unseal_mb_per_s": round(unseal, 1),
            "raw_aesgcm_mb_per_s": round(raw, 1),
            "seal_mb_per_s": round(payload / seal_seconds / 1e6, 1),
            "streaming_unseal_mb_per_s": round(streaming, 1),
            "ratio": round(unseal / raw, 3),
            "target": ">= 0.7",
            "streaming_ratio": round(streaming / raw, 3),
            "unseal_threads": torch_load_workers(),
        }
        _warm(plain)
        modes = (("plain", plain), ("plain_copy", plain), ("sealed", sealed_path))
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m, _ in modes}
        for _ in range(2):
            for mode, path in modes:
                runs[mode].append(_measure(mode, path, key))
        best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
        peak = {m: max(r["peak_rss_bytes"] for r in rs) for m, rs in runs.items()}
        yield {
            "name": "sealed_load_vs_plain_load",
            "model_mb": payload / MiB,
            "plain_load_s": round(best["plain"], 3),
            "plain_load_untouched_s": round(min(r["untouched_seconds"] for r in runs["plain"]), 4),
            "plain_copy_load_s": round(best["plain_copy"], 3),
            "sealed_load_s": round(best["sealed"], 3),
            "plain_peak_rss_mb": round(peak["plain"] / MiB, 1),
            "plain_copy_peak_rss_mb": round(peak["plain_copy"] / MiB, 1),
            "sealed_peak_rss_mb": round(peak["sealed"] / MiB, 1),
            "ratio": round(best["sealed"] / best["plain"], 3),
            "target": "<= 1.3",
            "ratio_vs_plain_copy": round(best["sealed"] / best["plain_copy"], 3),
            "sealed_memory_ratio": round(peak["sealed"] / payload, 3),
            "plain_memory_ratio": round(peak["plain"] / payload, 3),
            "memory_target": "<= 1.3",
        }


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
