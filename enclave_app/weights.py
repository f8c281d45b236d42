"""Dynamic weights: the model is never whole and plaintext in memory (``protection.weights``).

In ``dynamic`` mode the selected tensors (by default every weight matrix of the model's numbered blocks:
BERT's ``encoder.layer.N``, GPT-2's ``h.N``, Llama's ``layers.N``, an MLP's ``net.N``; embeddings, norms
and biases stay resident) are kept in enclave memory as ciphertext only:

* **At boot**, right after the handler is loaded, each selected tensor is encrypted with AES-256-GCM under
  a fresh per-boot key (32 bytes read from ``/dev/urandom`` straight into a ``bytearray``: never copied,
  never written anywhere, never leaving this object; one nonce per tensor from a counter) and its
  plaintext storage is overwritten with zeros. The parameter is pointed at an empty placeholder, so a
  forward pass that bypassed the hooks would fail, not compute with stale weights.
* **Slots**: ``budget`` preallocated buffers, each as large as the largest block's selected tensors
  (64-byte aligned regions, with the views for every block made once at boot).
* **Per forward pass**, a block's pre-forward hook decrypts its tensors straight into a slot
  (``Cipher.decryptor().update_into``: no plaintext copy on the heap; the tag is checked before the
  block runs, and a failed tag wipes the slot) and points the parameters at the slot's views; its
  forward hook overwrites the slot with zeros and points them back at the placeholder. With a budget of 2
  or more, the next block is decrypted on a background thread while the current one computes
  (cryptography's AES releases the GIL), never more blocks than the budget at once, and never past the
  last block (so nothing is decrypted ahead of the next request).
* **One pass at a time**: parameters are shared by every worker, so the handler's calls hold a lock and
  the enclave runs one model worker (``limits.workers`` 0 means 1 here; more is refused at config load).
  Concurrent callers still share one pass through the batcher, and one decryption per block serves the
  whole batch. Every slot is wiped when a call ends, however it ends.

Only model work decrypts: calls reach the handler after token, quota and admission checks
(``enclave_app/server.py``), and :attr:`DynamicWeights.decrypted_blocks` counts every block decryption
so that tests can prove a refused call caused none. Bad sections fail the config load
(:class:`enclave_app.config.WeightsPolicy`); a pattern that matches no tensor of the sealed model fails
the model load.

Hand-written because no library keeps torch parameters encrypted between uses; the primitives are
``cryptography``'s.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import nn

from enclave_app.config import WeightsPolicy
from enclave_app.models.base import ModelHandler, ModelLoadError
from nitrovault.errors import NitrovaultError

_ALIGN = 64
_TAG = 16


class WeightsIntegrityError(NitrovaultError):
    """A block's ciphertext in enclave memory failed authentication: the call fails (DATA_LOSS) and
    nothing of the block is used."""

    step = "weights"


class WeightsSelectionError(ModelLoadError):
    """``Protection.weights`` selects nothing usable in the sealed model. The message names only what the
    measured (public) config says, so the boot may report it to the parent as is."""


def handler_module(handler: ModelHandler) -> nn.Module:
    """The torch module a registered handler computes with."""
    for name in ("model", "module"):
        module = getattr(handler, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ModelLoadError("dynamic weights: this handler has no torch module")


@dataclass
class _Tensor:
    param: nn.Parameter
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    offset: int
    nonce: bytes
    ciphertext: bytes
    tag: bytes


@dataclass
class _Block:
    module: nn.Module
    tensors: list[_Tensor]
    nbytes: int  # the tensors' plaintext bytes
    size: int  # slot bytes the block's regions span
    #: per slot, the views of that slot's buffer in the block's tensors' shapes
    views: list[list[torch.Tensor]] = field(default_factory=list)


def select(module: nn.Module, policy: WeightsPolicy) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Block name → its selected ``(parameter name, parameter)``, in the module's order. A block is the
    parameter's innermost ancestor whose name ends in a number (else its own module)."""
    params = list(module.named_parameters())
    chosen: list[tuple[str, nn.Parameter]]
    if policy.tensors is None:
        chosen = [(n, p) for n, p in params if p.dim() >= 2 and _block_of(n) is not None]
    else:
        chosen = []
        for pattern in policy.tensors:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in params):
                raise WeightsSelectionError(f"Protection.weights.tensors pattern {pattern!r} matches no "
                                            "tensor of the sealed model")
        chosen = [(n, p) for n, p in params if any(fnmatch.fnmatchcase(n, q) for q in policy.tensors)]
    if not chosen:
        raise WeightsSelectionError("Protection.weights: the sealed model has no numbered blocks; name the "
                                    "tensors to keep encrypted with Protection.weights.tensors")
    blocks: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in chosen:
        blocks.setdefault(_block_of(name) or name.rpartition(".")[0], []).append((name, param))
    return blocks


def _block_of(name: str) -> str | None:
    parts = name.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return None


def _fresh_key() -> bytearray:
    """32 random bytes read straight into a ``bytearray`` (``os.urandom`` would leave an immutable copy
    of the key behind on the heap)."""
    key = bytearray(32)
    fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.readv(fd, [key]) != len(key):
            raise ModelLoadError("dynamic weights: short read from /dev/urandom")
    finally:
        os.close(fd)
    return key


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class DynamicWeights:
    """The selected tensors of ``module``, encrypted between uses (module docstring)."""

    def __init__(self, module: nn.Module, policy: WeightsPolicy) -> None:
        started = time.perf_counter()
        self.policy = policy
        self._key = _fresh_key()
        self._counter = 0
        self._placeholder = torch.empty(0)
        with torch.no_grad():
            self.blocks = [self._seal_block(module.get_submodule(name) if name else module, selected)
                           for name, selected in select(module, policy).items()]
        slot_size = max(b.size for b in self.blocks)
        self._slots = [torch.zeros(slot_size, dtype=torch.uint8) for _ in range(policy.budget)]
        for block in self.blocks:
            block.views = [[slot[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape)
                            for t in block.tensors] for slot in self._slots]
        self._index = {id(b.module): i for i, b in enumerate(self.blocks)}
        self._in_slot: list[int | None] = [None] * policy.budget  # block index each slot holds
        self._pending: dict[int, Future[None]] = {}
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="weights") if policy.budget > 1 else None
        self.lock = threading.RLock()
        self.decrypted_blocks = 0
        self.decrypted_bytes = 0
        self.decrypt_s = 0.0  # time spent decrypting (the bench's throughput)
        self.peak_plain_bytes = 0
        self._plain_now = 0
        self._stats = threading.Lock()
        for block in self.blocks:
            block.module.register_forward_pre_hook(self._before)
            block.module.register_forward_hook(self._after)
        self.seal_s = time.perf_counter() - started  # boot: encrypting, wiping, preparing the slots

    # -- boot ------------------------------------------------------------------------------------------

    def _seal_block(self, module: nn.Module, selected: list[tuple[str, nn.Parameter]]) -> _Block:
        tensors: list[_Tensor] = []
        offset = 0
        for _, param in selected:
            data = param.data
            if not data.is_contiguous() or data.device.type != "cpu":
                raise ModelLoadError("dynamic weights: selected tensors must be contiguous CPU tensors")
            nbytes = data.numel() * data.element_size()
            nonce = self._nonce()
            encryptor = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
            plain = data.view(-1).view(torch.uint8).numpy()
            ciphertext = encryptor.update(plain.data) + encryptor.finalize()
            tensors.append(_Tensor(param, data.shape, data.dtype, nbytes, offset, nonce, ciphertext,
                                   encryptor.tag))
            data.zero_()  # the unsealed plaintext (the load buffer the parameter pointed into)
            param.data = self._placeholder
            offset = _align(offset + nbytes + _TAG)
        return _Block(module, tensors, sum(t.nbytes for t in tensors), offset)

    @property
    def plain_bytes(self) -> int:
        """The selected tensors' plaintext size."""
        return sum(b.nbytes for b in self.blocks)

    def _nonce(self) -> bytes:
        self._counter += 1
        return self._counter.to_bytes(12, "big")

    # -- per pass --------------------------------------------------------------------------------------

    def _before(self, module: nn.Module, args: Any) -> None:
        i = self._index[id(module)]
        slot = self._slot_for(i)
        pending = self._pending.pop(i, None)
        if pending is not None:
            pending.result()
        elif self._in_slot[slot] != i:
            self._decrypt(i, slot)
        for tensor, view in zip(self.blocks[i].tensors, self.blocks[i].views[slot], strict=True):
            tensor.param.data = view
        nxt = i + 1
        if self._prefetch is not None and nxt < len(self.blocks) and nxt not in self._pending:
            nxt_slot = self._slot_for(nxt)
            if self._in_slot[nxt_slot] is None:
                self._in_slot[nxt_slot] = nxt  # reserved now: the slot is not free for anything else
                self._pending[nxt] = self._prefetch.submit(self._decrypt, nxt, nxt_slot)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        i = self._index[id(module)]
        self._wipe(self._slot_for(i), i)

    def _slot_for(self, i: int) -> int:
        return i % self.policy.budget

    def _decrypt(self, i: int, slot: int) -> None:
        block = self.blocks[i]
        buffer = self._slots[slot].numpy().data
        self._in_slot[slot] = i
        with self._stats:
            self.decrypted_blocks += 1
            self.decrypted_bytes += block.nbytes
            self._plain_now += block.nbytes
            self.peak_plain_bytes = max(self.peak_plain_bytes, self._plain_now)
        started = time.perf_counter()
        try:
            for tensor in block.tensors:
                decryptor = Cipher(algorithms.AES(self._key),
                                   modes.GCM(tensor.nonce, tensor.tag)).decryptor()
                out = buffer[tensor.offset:tensor.offset + tensor.nbytes + _TAG]
                decryptor.update_into(tensor.ciphertext, out)
                decryptor.finalize()
        except InvalidTag:
            self._wipe(slot, i)
            raise WeightsIntegrityError("a block of the model's weights failed authentication in enclave "
                                        "memory") from None
        finally:
            with self._stats:
                self.decrypt_s += time.perf_counter() - started

    def _wipe(self, slot: int, i: int) -> None:
        if self._in_slot[slot] != i:
            return
        block = self.blocks[i]
        self._slots[slot][: block.size].zero_()
        for tensor in block.tensors:
            tensor.param.data = self._placeholder
        self._in_slot[slot] = None
        with self._stats:
            self._plain_now -= block.nbytes

    def wipe_all(self) -> None:
        """Wait for any prefetch, then overwrite every slot: nothing decrypted outlives a call."""
        for pending in list(self._pending.values()):
            with suppress(WeightsIntegrityError):  # the failed block wiped itself
                pending.result()
        self._pending.clear()
        for slot, i in enumerate(self._in_slot):
            if i is not None:
                self._wipe(slot, i)

    @contextmanager
    def session(self) -> Iterator[None]:
        """One call's use of the weights: exclusive, and every slot wiped at the end."""
        with self.lock:
            try:
                yield
            finally:
                self.wipe_all()

    def plaintext_blocks(self) -> int:
        """How many blocks are decrypted right now (for tests and the bench)."""
        return sum(i is not None for i in self._in_slot)


class DynamicHandler:
    """A handler whose calls run inside :meth:`DynamicWeights.session`; everything else is the inner
    handler's (``generate`` only if the inner handler has it)."""

    def __init__(self, inner: ModelHandler, weights: DynamicWeights) -> None:
        self.inner = inner
        self.weights = weights
        self.kind: str = inner.kind

    @property
    def rows_independent(self) -> bool:
        return self.inner.rows_independent

    def warm_up(self) -> None:
        with self.weights.session():
            self.inner.warm_up()

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        with self.weights.session():
            return self.inner.embed(texts, normalize=normalize)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.weights.session():
            return self.inner.infer(inputs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        return self._in_session(value) if name == "generate" else value

    def _in_session(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.weights.session():
                return method(*args, **kwargs)

        return call


def protect_weights(policy: WeightsPolicy, handler: ModelHandler) -> ModelHandler:
    """``handler`` as the policy asks: itself when resident, a :class:`DynamicHandler` when dynamic."""
    if not policy.dynamic:
        return handler
    return DynamicHandler(handler, DynamicWeights(handler_module(handler), policy))
