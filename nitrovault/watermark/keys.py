"""Watermark keys: one owner secret, one independent key per mark type (HKDF-SHA256, RFC 5869).

Invariants:

* Each mark type (weights, embeddings, generated text) gets its own 32-byte key, derived with a distinct
  HKDF ``info`` label that also binds the model id, so a key for one model or one mark type says nothing
  about another (HKDF's outputs for different ``info`` are independent PRF outputs).
* The owner secret never leaves this function; :class:`WatermarkKeys` hides its fields from ``repr`` so a
  stray log line cannot print them.
* **Per-subject keys** (:func:`derive_subject_key`): a second HKDF from the model's embedding or text key,
  ``info = "nitrovault/watermark/v1/subject/<kind>" || 0x00 || subject``. One key per (model, mark type,
  subject); the enclave derives them on demand from the keys it derived at boot, so it needs nothing
  beyond the sealed secret, and the owner re-derives any subject's key from ``owner.key`` to trace a
  leak (``nitrovault watermark trace``). Knowing one subject's key says nothing about another's or about
  the model's key (HKDF is one-way and its outputs for distinct ``info`` are independent PRF outputs).

Where the secret comes from:

* **Owner side** (``nitrovault watermark embed|detect|detect-text``): a key file (see :func:`parse_key_file`)
  kept with the owner's other secrets.
* **In the enclave** (output marks): the secret is released by KMS together with the model's data key (the
  same attested ``Decrypt`` with ``Recipient``; the parent only ever sees ciphertext). The enclave calls
  ``derive_watermark_keys(secret, model_id)`` once at boot, after the key release, and zeroes the secret.
  That wiring is not in this module (it is pure: bytes in, keys out).

Example::

    >>> keys = derive_watermark_keys(bytes(32), "all-minilm-l6-v2")
    >>> len(keys.weights), keys.weights != keys.text
    (32, True)
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nitrovault.errors import ConfigError

#: HKDF salt: fixed and public (RFC 5869 §3.1: a non-secret salt still strengthens extraction)
SALT = b"nitrovault/watermark/v1"
#: the ``info`` labels, one per mark type (changing one changes every mark of that type)
LABELS = {
    "weights": b"nitrovault/watermark/v1/weights",
    "embedding": b"nitrovault/watermark/v1/embedding",
    "text": b"nitrovault/watermark/v1/text",
}
#: the ``info`` prefix of per-subject keys (:func:`derive_subject_key`), followed by the mark type
SUBJECT_LABEL = b"nitrovault/watermark/v1/subject/"
T = TypeVar("T")
#: the shortest owner secret accepted (256 bits)
MIN_SECRET_BYTES = 32

#: the output marks that can be keyed per subject
SubjectMarkKind = Literal["embedding", "text"]


@dataclass(frozen=True)
class WatermarkKeys:
    """The per-mark-type keys of one model. Fields are secret: not shown by ``repr``."""

    model_id: str
    #: key of the weight watermark (secret directions and message bits)
    weights: bytes = field(repr=False)
    #: key of the embedding (EmbMarker) watermark (trigger words and target vector)
    embedding: bytes = field(repr=False)
    #: key of the generated-text (green list) watermark
    text: bytes = field(repr=False)


def _hkdf(secret: bytes, label: bytes, name: str) -> bytes:
    info = label + b"\x00" + name.encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=info).derive(secret)


def derive_watermark_keys(secret: bytes, model_id: str) -> WatermarkKeys:
    """Derive the three watermark keys of ``model_id`` from the owner ``secret`` (≥ 32 bytes)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"watermark secret must be at least {MIN_SECRET_BYTES} bytes")
    if not model_id:
        raise ConfigError("watermark keys need a non-empty model id")
    return WatermarkKeys(
        model_id=model_id,
        weights=_hkdf(secret, LABELS["weights"], model_id),
        embedding=_hkdf(secret, LABELS["embedding"], model_id),
        text=_hkdf(secret, LABELS["text"], model_id),
    )


def derive_subject_key(keys: WatermarkKeys, kind: SubjectMarkKind, subject: str) -> bytes:
    """The 32-byte key of ``subject``'s own output mark of type ``kind`` (``"embedding"`` or ``"text"``).

    HKDF-SHA256 from the model's ``kind`` key, salt :data:`SALT`,
    ``info = SUBJECT_LABEL || kind || 0x00 || utf8(subject)``. The subject is the access token's ``sub``,
    byte for byte (no normalisation: two spellings are two subjects). The model id is already bound into
    the model's key, so it is not repeated here.
    """
    if kind not in ("embedding", "text"):
        raise ConfigError(f"no per-subject key for mark type {kind!r}")
    if not subject:
        raise ConfigError("a per-subject watermark key needs a non-empty subject")
    try:
        return _hkdf(keys.embedding if kind == "embedding" else keys.text, SUBJECT_LABEL + kind.encode(),
                     subject)
    except UnicodeEncodeError:  # a lone surrogate: not a subject any token can carry
        raise ConfigError("a watermark subject must be valid Unicode text") from None


def parse_key_file(data: bytes) -> bytes:
    """The owner secret in a key file: hex text (64+ hex digits, whitespace ignored) or ≥ 32 raw bytes."""
    text = b"".join(data.split())
    if len(text) >= 2 * MIN_SECRET_BYTES and len(text) % 2 == 0:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    if len(data) >= MIN_SECRET_BYTES:
        return data
    raise ConfigError(f"watermark key file must hold at least {MIN_SECRET_BYTES} bytes (raw or hex)")


def keystream(key: bytes, label: bytes, nbytes: int) -> bytes:
    """``nbytes`` of ChaCha20 keystream under ``HMAC-SHA256(key, label)`` (a specified, portable PRG)."""
    stream_key = hmac.new(key, label, hashlib.sha256).digest()
    encryptor = Cipher(algorithms.ChaCha20(stream_key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


class SubjectCache(Generic[T]):
    """The per-subject values (marks, green lists) of the subjects seen last: at most ``size`` of them,
    least recently used out, thread-safe. A value is made outside the lock (an HKDF, a keystream): two
    threads making the same subject's value make equal ones, and either is kept."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._values: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, subject: str, make: Callable[[], T]) -> T:
        with self._lock:
            found = self._values.get(subject)
            if found is not None:
                self._values.move_to_end(subject)
                return found
        made = make()
        with self._lock:
            self._values[subject] = made
            self._values.move_to_end(subject)
            while len(self._values) > self._size:
                self._values.popitem(last=False)
        return made
