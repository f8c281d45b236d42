"""The tiny GPT-2 the local stack and the tests serve: trained here, deterministic, cached whole or not."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

from nitrovault.local.homes import StackError
from nitrovault.local.tiny_lm import (
    RECORD,
    TEST,
    TinyLmSettings,
    build_tiny_lm,
    ensure_tiny_lm,
    project_corpus,
    repo_root,
    sealing_metadata,
)

#: a few seconds' worth less than TEST: for the properties that do not need a good model
QUICK = replace(TEST, vocab_size=300, n_layer=1, n_embd=32, steps=20, seq_len=32)
CORPUS = ("The parent relays bytes it cannot read. The enclave keeps the weights sealed. "
          "Café, naïve and 東京 are text too.\n") * 40


def test_the_served_tiny_lm_is_far_better_than_uniform_and_its_tokenizer_round_trips(tiny_lm: Path) -> None:
    record = json.loads((tiny_lm / RECORD).read_text())
    assert record["settings"]["vocab_size"] == TEST.vocab_size
    assert record["held_out_perplexity"] < TEST.vocab_size / 2  # held-out text, never trained on
    assert record["held_out_tokens"] > 1000 and record["train_tokens"] >= 18 * record["held_out_tokens"]
    tok = Tokenizer.from_file(str(tiny_lm / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0
    for text in ("The enclave attests to KMS.", "naïve 東京 🙂\n\tx", project_corpus(repo_root())[:2000]):
        assert tok.decode(tok.encode(text).ids) == text
    model = GPT2LMHeadModel.from_pretrained(tiny_lm)
    assert model.config.n_positions == TEST.n_positions and model.config.eos_token_id == 0
    metadata = sealing_metadata(tiny_lm)
    assert metadata["nitrovault.handler"] == "causal-lm:gpt2"
    assert json.loads(metadata["nitrovault.config"])["vocab_size"] == TEST.vocab_size


def test_a_build_is_deterministic_and_leaves_the_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_tiny_lm(tmp_path / "a", CORPUS, QUICK)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_tiny_lm(tmp_path / "b", CORPUS, QUICK)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = build_tiny_lm(tmp_path / "c", CORPUS, replace(QUICK, seed=1))
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_ensure_reuses_a_build_only_for_the_same_settings_and_corpus(tmp_path: Path) -> None:
    first = ensure_tiny_lm(tmp_path, CORPUS, QUICK)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_lm(tmp_path, CORPUS, QUICK) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    other_settings = ensure_tiny_lm(tmp_path, CORPUS, replace(QUICK, steps=21))
    assert other_settings != first and first.is_dir()  # builds of other settings are kept
    edited = ensure_tiny_lm(tmp_path, CORPUS + "More.", QUICK)
    assert edited != first and not first.exists()  # an older corpus' build of the same settings is gone
    assert other_settings.is_dir()
    first = ensure_tiny_lm(tmp_path, CORPUS, QUICK)
    assert not edited.exists()
    # a folder whose record names another digest (or has none) is rebuilt in place
    (first / RECORD).write_text(json.dumps({"digest": "0" * 64}))
    assert ensure_tiny_lm(tmp_path, CORPUS, QUICK) == first
    assert json.loads((first / RECORD).read_text())["digest"] == QUICK.digest(CORPUS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize(("change", "words"), [
    ({"n_head": 3}, "does not divide"),
    ({"vocab_size": 200}, "256 byte symbols"),
    ({"seq_len": 500}, "exceeds n_positions"),
    ({"steps": 0}, "positive"),
    ({"lr": 0.0}, "lr must be positive"),
])
def test_bad_settings_are_refused(change: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        replace(QUICK, **change)  # type: ignore[arg-type]


def test_no_corpus_or_too_little_of_it_is_a_stack_error(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no README"):
        project_corpus(tmp_path)
    with pytest.raises(StackError, match="empty"):
        build_tiny_lm(tmp_path / "x", "  \n", QUICK)
    with pytest.raises(StackError, match="training tokens"):
        build_tiny_lm(tmp_path / "x", "tiny corpus", QUICK)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with pytest.raises(StackError, match="not a tiny LM folder"):
        sealing_metadata(tmp_path)


def test_settings_digest_covers_every_field() -> None:
    digests = {QUICK.digest(CORPUS)}
    for name, value in (("vocab_size", 301), ("n_layer", 2), ("n_head", 1), ("n_embd", 64),
                        ("n_positions", 64), ("steps", 21), ("batch", 8), ("seq_len", 16), ("lr", 1e-3),
                        ("seed", 9)):
        digests.add(replace(QUICK, **{name: value}).digest(CORPUS))  # type: ignore[arg-type]
    assert len(digests) == 11
    assert isinstance(QUICK, TinyLmSettings)
