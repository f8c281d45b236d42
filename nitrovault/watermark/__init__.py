"""Ownership watermarks: in the weights (before sealing) and in the outputs (applied in the enclave).

* :mod:`nitrovault.watermark.keys`: per-mark-type keys, HKDF-SHA256 from one owner secret.
* :mod:`nitrovault.watermark.weights`: secret-projection weight mark with a binomial test (Uchida-style),
  hidden-unit re-alignment against a reference.
* :mod:`nitrovault.watermark.embedding`: EmbMarker backdoor mark for embedding services.
* :mod:`nitrovault.watermark.text`: Kirchenbauer green-list mark for generated tokens.

All pure (numpy / torch tensors in, values out); file I/O lives in ``nitrovault.cli.watermark_cmd``.
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
from nitrovault.watermark.text import GreenList, GreenListProcessor, TextDetection, detect_text_mark
from nitrovault.watermark.weights import (
    EmbedReport,
    WeightDetection,
    align_to_reference,
    detect_weight_mark,
    embed_weight_mark,
)

__all__ = [
    "EmbedReport",
    "EmbeddingDetection",
    "EmbeddingMark",
    "GreenList",
    "GreenListProcessor",
    "TextDetection",
    "WatermarkKeys",
    "WeightDetection",
    "align_to_reference",
    "derive_embedding_mark",
    "derive_watermark_keys",
    "detect_embedding_mark",
    "detect_text_mark",
    "detect_weight_mark",
    "embed_weight_mark",
    "mark_embedding",
    "mark_embeddings",
    "parse_key_file",
    "verification_texts",
]
