"""Ownership watermarks: in the weights (before sealing) and in the outputs (applied in the enclave).

* :mod:`nitrovault.watermark.keys`: per-mark-type keys, HKDF-SHA256 from one owner secret.
* :mod:`nitrovault.watermark.weights`: secret-projection weight mark with a binomial test (Uchida-style),
  hidden-unit re-alignment against a reference. The owner's tool (applied before sealing, detected on a
  suspect copy): import it by its module; it is not re-exported here and not in the enclave image.
* :mod:`nitrovault.watermark.embedding`: EmbMarker backdoor mark for embedding services.
* :mod:`nitrovault.watermark.text`: Kirchenbauer green-list mark for generated tokens.
* :mod:`nitrovault.watermark.subjects`: per-subject output fingerprints: naming the subject behind a leak
  (Bonferroni over exact per-subject tests; the tests are ``trace_embedding_subjects`` and
  ``trace_text_subjects`` beside their marks).

All pure (numpy arrays in, values out; no torch: the generation-loop side of the text mark is
:mod:`enclave_app.models.green_list`); file I/O lives in ``nitrovault.cli.watermark_cmd``.
Spec, tests and measured robustness: ``docs/watermarks.md``.
"""

from __future__ import annotations

from nitrovault.watermark.embedding import (
    EmbeddingDetection,
    EmbeddingMark,
    derive_embedding_mark,
    detect_embedding_mark,
    mark_embedding,
    mark_embeddings,
    verification_texts,
)
from nitrovault.watermark.keys import WatermarkKeys, derive_watermark_keys, parse_key_file
from nitrovault.watermark.text import GreenList, TextDetection, detect_text_mark

__all__ = [
    "EmbeddingDetection",
    "EmbeddingMark",
    "GreenList",
    "TextDetection",
    "WatermarkKeys",
    "derive_embedding_mark",
    "derive_watermark_keys",
    "detect_embedding_mark",
    "detect_text_mark",
    "mark_embedding",
    "mark_embeddings",
    "parse_key_file",
    "verification_texts",
]
