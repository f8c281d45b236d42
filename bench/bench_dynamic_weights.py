"""Dynamic weights (``protection.weights.mode = dynamic``, ``enclave_app/weights.py``) against resident
weights, side by side in one run (``python -m bench.run dynamic_weights``).

* ``dynamic_vs_resident_latency`` (one line per ``batch`` of 1, 8 and 32 sentences): the p50 of the
  demo MiniLM's ``embed`` (the work behind one ``Embed`` call or one batch the scheduler gathered) with
  dynamic weights over the same call with resident weights, calls of the two alternating so that both
  see the same machine. Two handlers from the same weights: one resident, one wrapped as the enclave's
  boot wraps it (default policy: budget 1). Target <= 2.0 at batch 32.
* ``peak_plaintext_fraction``: the largest share of the dynamic tensors' bytes that was plaintext at any
  instant during every call above (:attr:`DynamicWeights.peak_plain_bytes`). Target <= 0.2 for MiniLM's
  6 blocks. Beside it, the same peak as a share of the whole model's weights (embeddings and norms stay
  resident) and the figure for budget 2.
* ``reencrypt_throughput_mb_s``: MB/s of the in-memory AEAD as the hooks run it (AES-256-GCM decrypting
  each tensor into its slot with ``update_into``, measured inside the calls above) over one-shot
  ``AESGCM.decrypt`` of the same ciphertexts (a fresh plaintext buffer each time); ChaCha20-Poly1305 on the
  same bytes beside it (the "faster AEAD" question), and the boot-time re-encryption.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from enclave_app.config import WeightsPolicy
from enclave_app.weights import DynamicHandler, DynamicWeights, handler_module, protect_weights
from nitrovault.local.models import demo_handler

BATCHES = (1, 8, 32)
#: alternating calls per batch size (the p50 of each side)
CALLS = {1: 200, 8: 60, 32: 30}
WARMUP = 3
AEAD_ROUNDS = 5
SENTENCES = [
    "The enclave decrypts one block of weights at a time.",
    "A man is eating food in the kitchen this morning.",
    "Attestation binds the key release to the measured image.",
    "The parent instance relays bytes it cannot read.",
]


def _texts(batch: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(batch)]


def _dynamic(budget: int) -> DynamicHandler:
    handler = protect_weights(WeightsPolicy(mode="dynamic", budget=budget), demo_handler())
    assert isinstance(handler, DynamicHandler)
    handler.warm_up()
    return handler


def _alternating(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    """The p50 (ms) of ``a`` and of ``b``, called in turn ``n`` times each after a warm-up."""
    for _ in range(WARMUP):
        a()
        b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for fn, out in ((a, times[0]), (b, times[1])):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def _mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _one_shot_mb_s(aead: Any, weights: DynamicWeights) -> float:
    """MB/s of ``aead`` decrypting every dynamic tensor's bytes, one-shot, ``AEAD_ROUNDS`` times."""
    sealed = []
    for block in weights.blocks:
        for tensor in block.tensors:
            nonce = os.urandom(12)
            plain = bytes(tensor.nbytes)
            sealed.append((nonce, aead.encrypt(nonce, plain, None)))
    started = time.perf_counter()
    for _ in range(AEAD_ROUNDS):
        for nonce, ciphertext in sealed:
            aead.decrypt(nonce, ciphertext, None)
    return _mb_s(AEAD_ROUNDS * weights.plain_bytes, time.perf_counter() - started)


def run() -> Iterator[dict[str, object]]:
    resident = demo_handler()
    resident.warm_up()
    whole = sum(p.numel() * p.element_size() for p in handler_module(resident).parameters())
    dynamic = _dynamic(budget=1)
    weights = dynamic.weights
    for batch in BATCHES:
        texts = _texts(batch)
        plain_ms, dynamic_ms = _alternating(partial(resident.embed, texts, normalize=True),
                                            partial(dynamic.embed, texts, normalize=True), CALLS[batch])
        yield {"name": "dynamic_vs_resident_latency", "batch": batch,
               "ratio": round(dynamic_ms / plain_ms, 3), "dynamic_p50_ms": round(dynamic_ms, 3),
               "resident_p50_ms": round(plain_ms, 3), "calls": CALLS[batch], "budget": 1,
               "blocks": len(weights.blocks), "target": 2.0 if batch == 32 else None}

    two = _dynamic(budget=2)
    texts = _texts(8)
    for _ in range(10):
        two.embed(texts, normalize=True)
    peak = weights.peak_plain_bytes / weights.plain_bytes
    yield {"name": "peak_plaintext_fraction", "value": round(peak, 4),
           "target": 0.2, "budget": 1, "blocks": len(weights.blocks),
           "peak_plain_bytes": weights.peak_plain_bytes, "dynamic_bytes": weights.plain_bytes,
           "model_bytes": whole, "of_whole_model": round(weights.peak_plain_bytes / whole, 4),
           "dynamic_share_of_model": round(weights.plain_bytes / whole, 4),
           "budget_2_value": round(two.weights.peak_plain_bytes / two.weights.plain_bytes, 4),
           "decrypted_blocks": weights.decrypted_blocks}

    hooks = _mb_s(weights.decrypted_bytes, weights.decrypt_s)
    raw = _one_shot_mb_s(AESGCM(os.urandom(32)), weights)
    yield {"name": "reencrypt_throughput_mb_s", "value": hooks, "ratio": round(hooks / raw, 3),
           "in_memory_aead": "AES-256-GCM update_into", "raw_aes_gcm_mb_s": raw,
           "chacha20_poly1305_mb_s": _one_shot_mb_s(ChaCha20Poly1305(os.urandom(32)), weights),
           "boot_reencrypt_s": round(weights.seal_s, 3),
           "boot_reencrypt_mb_s": _mb_s(weights.plain_bytes, weights.seal_s),
           "decrypted_mb": round(weights.decrypted_bytes / 1e6, 1)}
