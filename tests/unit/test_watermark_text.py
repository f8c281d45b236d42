"""Green-list text watermark: the keyed list, the logits processor, z-scores of clean vs marked samples."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from enclave_app.models.green_list import GreenListProcessor
from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import derive_watermark_keys
from nitrovault.watermark.text import GreenList, detect_text_mark, z_score

KEYS = derive_watermark_keys(bytes(range(32)), "lm")
V = 500


def _lm_logits(seed: int = 0) -> torch.Tensor:
    """A fixed random bigram LM with moderate entropy: logits[previous] -> next-token logits."""
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 1.5


def _generate(processor: GreenListProcessor | None, n: int, length: int, seed: int) -> list[list[int]]:
    logits = _lm_logits()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, 1), generator=g)
    for _ in range(length - 1):
        scores = logits[ids[:, -1]]
        if processor is not None:
            scores = processor(ids, scores)
        ids = torch.cat([ids, torch.multinomial(torch.softmax(scores, -1), 1, generator=g)], dim=1)
    return ids.tolist()


def test_green_list_is_keyed_exact_size_and_pinned() -> None:
    green = GreenList(KEYS, vocab_size=V, gamma=0.25)
    mask = green.mask(3)
    assert mask.sum() == 125 and not mask.flags.writeable
    assert not np.array_equal(mask, green.mask(4))
    other = GreenList(derive_watermark_keys(bytes(32), "lm"), vocab_size=V, gamma=0.25)
    assert not np.array_equal(mask, other.mask(3))
    # HMAC-SHA256 + ChaCha20 are specified: this value must not change across devices or library versions
    digest = hashlib.sha256(np.packbits(GreenList(derive_watermark_keys(bytes(32), "m"), vocab_size=100,
                                                  gamma=0.5).mask(0)).tobytes()).hexdigest()
    assert digest == PINNED_MASK_DIGEST
    assert "key" not in repr(green) and KEYS.text.hex() not in repr(green)


def test_processor_adds_delta_to_green_logits_only() -> None:
    processor = GreenListProcessor(KEYS, gamma=0.25, delta=2.0, vocab_size=V)
    ids = torch.tensor([[1, 7], [2, 9]])
    out = processor(ids, torch.zeros(2, V))
    for row, previous in enumerate((7, 9)):
        expected = torch.from_numpy(processor.green.mask(previous).astype(np.float32)) * 2.0
        assert torch.equal(out[row], expected)
    with pytest.raises(ConfigError):
        processor(ids, torch.zeros(2, V + 1))


def test_z_scores_clean_vs_watermarked() -> None:
    green = GreenList(KEYS, vocab_size=V, gamma=0.25)
    processor = GreenListProcessor(KEYS, gamma=0.25, delta=2.0, vocab_size=V)
    marked = [detect_text_mark(s, green) for s in _generate(processor, 20, 200, seed=1)]
    clean = [detect_text_mark(s, green) for s in _generate(None, 20, 200, seed=2)]
    assert min(r.z for r in marked) > 4.0 and all(r.detected for r in marked)
    assert max(r.z for r in clean) < 3.0 and not any(r.detected for r in clean)
    assert all(r.p_value < 1e-4 for r in marked)
    # the wrong key sees no mark in watermarked text
    wrong = GreenList(derive_watermark_keys(bytes(32), "lm"), vocab_size=V, gamma=0.25)
    assert max(detect_text_mark(s, wrong).z for s in _generate(processor, 5, 200, seed=1)) < 3.0


def test_survives_random_substitutions_of_a_tenth_of_the_tokens() -> None:
    green = GreenList(KEYS, vocab_size=V, gamma=0.25)
    processor = GreenListProcessor(KEYS, gamma=0.25, delta=2.0, vocab_size=V)
    rng = np.random.default_rng(0)
    for sample in _generate(processor, 10, 200, seed=3):
        attacked = [int(rng.integers(V)) if rng.random() < 0.1 else t for t in sample]
        assert detect_text_mark(attacked, green).detected


def test_repeated_pairs_are_scored_once() -> None:
    green = GreenList(KEYS, vocab_size=V, gamma=0.25)
    nxt = int(np.flatnonzero(green.mask(5))[0])
    loop = [5, nxt] * 50
    assert detect_text_mark(loop, green).scored == 2
    assert detect_text_mark(loop, green, ignore_repeated=False).scored == 99


def test_z_score_and_refusals() -> None:
    assert z_score(25, 100, 0.25) == 0.0
    assert z_score(50, 100, 0.25) == pytest.approx(25 / np.sqrt(18.75))
    green = GreenList(KEYS, vocab_size=V, gamma=0.25)
    assert not detect_text_mark([1], green).detected
    with pytest.raises(ConfigError):
        detect_text_mark([1, V], green)
    with pytest.raises(ConfigError):
        GreenList(KEYS, vocab_size=V, gamma=1.0)
    with pytest.raises(ConfigError):
        GreenListProcessor(KEYS, delta=-1, vocab_size=V)


PINNED_MASK_DIGEST = "3e90cacc2e670aef4beb5e5f63e1af02121cc88e440db959b231763135325ec7"
