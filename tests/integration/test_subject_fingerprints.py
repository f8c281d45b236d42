"""Per-subject output fingerprints on real models: a leaked output set, or a surrogate trained on one,
names its subject among 100; other subjects' and unmarked outputs name nobody (1000-test calibrations);
through the enclave's gRPC server (``Infer`` tokens, streamed ``Generate`` text of the tiny GPT-2,
``Embed``) two subjects with their own tokens get outputs that trace to themselves, and the audit log
learns nothing of the mark. ``nitrovault watermark trace`` on real files.

Embeddings: the packaged MiniLM (``nitrovault.local.models.demo_handler``) through the real
:class:`~enclave_app.outputs.OutputGuard`. Text: the ``causal-lm:bigram`` handler with the processor
:func:`enclave_app.boot.attach_text_watermark` attaches, run through :class:`enclave_app.forward.Forward`
(which sets the subject scope on the thread that runs it), as the server does. Pure parts:
``tests/unit/test_subject_trace.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from handlers import lm_handler
from test_enclave_server import CONFIG, DIGEST, ISSUER, PCRS
from test_output_protection import Served, with_protection
from test_server_generate import Served as GenerateServer
from test_server_generate import lm_config
from typer.testing import CliRunner

from enclave_app.boot import attach_text_watermark
from enclave_app.forward import Forward, InferCall
from enclave_app.models import ModelHandler, load_handler
from enclave_app.outputs import GuardNotes, OutputGuard, SealedExtras
from enclave_app.server import ServingModel
from nitrovault.attestation import load_root
from nitrovault.cli.watermark_cmd import app
from nitrovault.local.models import demo_handler, demo_watermark_candidates
from nitrovault.local.nsm import make_local_nsm
from nitrovault.watermark.embedding import (
    EmbeddingMark,
    fit_bow_surrogate,
    trace_embedding_subjects,
    trigger_weight,
    verification_texts,
)
from nitrovault.watermark.keys import derive_watermark_keys
from nitrovault.watermark.subjects import DEFAULT_TRACE_THRESHOLD
from nitrovault.watermark.text import trace_text_subjects

SECRET = bytes(range(32))
KEYS = derive_watermark_keys(SECRET, CONFIG.model_id)
#: the owner's list: every subject ever issued a token
SUBJECTS = [f"user-{i:03d}@example.com" for i in range(100)]
LEAKER = SUBJECTS[37]
#: subjects not on the list (their outputs must name nobody)
UNLISTED = [f"outsider-{i}" for i in range(5)]
FILLER = ["the", "a", "of", "and", "to", "in", "with", "for", "on", "near"]

#: the calibrations: 10 null output sets x 100 listed subjects = 1000 tests, each exact. Every set is tested
#: against its own 100 subjects (:func:`_null_list`), so no subject's direction or green list is used
#: twice and the 1000 tests are independent given the outputs (one key each; reusing one list for every
#: set would correlate the tests of similar sets). At a loose level of 0.01 the count of p-values below
#: it is then Binomial(1000, 0.01) (at most that, for the discrete text test): [2, 22] holds it with
#: probability > 0.999.
LOOSE_LEVEL = 0.01
LOOSE_COUNT_RANGE = (2, 22)


def _null_list(k: int) -> list[str]:
    """The 100 listed subjects of the calibration's ``k``-th null set (none of them produced it)."""
    return [f"listed-{k}-{i:03d}" for i in range(100)]


def _texts(n: int, seed: int) -> list[str]:
    """Short texts over the demo's candidate words and function words (a sixth carry a trigger)."""
    rng = np.random.default_rng(seed)
    words = demo_watermark_candidates()
    return [" ".join(rng.choice(FILLER) if rng.random() < 0.5 else rng.choice(words)
                     for _ in range(int(rng.integers(6, 10)))) for _ in range(n)]


# -- embeddings: MiniLM through the output guard ------------------------------------------------------------

PER_SUBJECT_EMBEDDINGS = {"watermark": {"embedding": {"per_subject": True}}}


@pytest.fixture(scope="module")
def minilm() -> ModelHandler:
    return demo_handler()


@pytest.fixture(scope="module")
def guard(minilm: ModelHandler) -> OutputGuard:
    extras = SealedExtras(watermark_keys=KEYS, candidates=tuple(demo_watermark_candidates()))
    return OutputGuard.for_handler(with_protection(PER_SUBJECT_EMBEDDINGS).protection, extras, minilm)


@pytest.fixture(scope="module")
def corpus(minilm: ModelHandler) -> tuple[list[str], np.ndarray]:
    """800 texts and the model's own (unmarked) embeddings of them."""
    texts = _texts(800, 0)
    return texts, np.concatenate([minilm.embed(texts[i:i + 100], normalize=True) for i in range(0, 800, 100)])


def _served(guard: OutputGuard, subject: str, texts: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    notes = GuardNotes()
    out = guard.embeddings(subject, texts, vectors, notes)
    assert notes.to_audit() is None  # nothing about the mark reaches the audit record
    return out


def _mark(guard: OutputGuard) -> EmbeddingMark:
    assert guard.embedding_mark is not None
    return guard.embedding_mark


def test_a_leaked_embedding_set_names_its_subject_among_100(
        guard: OutputGuard, corpus: tuple[list[str], np.ndarray]) -> None:
    texts, clean = corpus[0][:150], corpus[1][:150]
    mark = _mark(guard)
    assert 0.05 < np.mean([trigger_weight(t, mark) > 0 for t in texts]) < 0.4
    traced = trace_embedding_subjects(texts, _served(guard, LEAKER, texts, clean), mark, KEYS, SUBJECTS)
    assert traced.subject == LEAKER and traced.log10_p_value < -20, traced.as_dict()
    assert traced.rows == sum(trigger_weight(t, mark) > 0 for t in texts)


def test_a_surrogate_trained_on_one_subjects_embeddings_names_that_subject(
        guard: OutputGuard, corpus: tuple[list[str], np.ndarray], minilm: ModelHandler) -> None:
    texts, clean = corpus
    mark = _mark(guard)
    stolen = fit_bow_surrogate(texts, _served(guard, LEAKER, texts, clean))
    independent = fit_bow_surrogate(texts, clean)
    # the owner queries the suspect with the backdoor texts (m trigger words each)
    backdoor, _ = verification_texts(mark, demo_watermark_candidates(), 200, np.random.default_rng(1))
    traced = trace_embedding_subjects(backdoor, stolen(backdoor), mark, KEYS, SUBJECTS)
    assert traced.subject == LEAKER and traced.log10_p_value < -10, traced.as_dict()
    assert trace_embedding_subjects(backdoor, independent(backdoor), mark, KEYS, SUBJECTS).subject is None
    # the model itself, unmarked, names nobody either
    unmarked = minilm.embed(backdoor, normalize=True)
    assert trace_embedding_subjects(backdoor, unmarked, mark, KEYS, SUBJECTS).subject is None


def test_embedding_calibration_over_1000_null_tests(
        guard: OutputGuard, corpus: tuple[list[str], np.ndarray]) -> None:
    """5 unmarked output sets and 5 sets of unlisted subjects, 80 texts each, x 100 listed subjects."""
    texts, clean = corpus
    mark = _mark(guard)
    raw: list[float] = []
    for k in range(10):
        part = slice(150 + 60 * k, 150 + 60 * k + 80)
        outputs = clean[part] if k < 5 else _served(guard, UNLISTED[k - 5], texts[part], clean[part])
        traced = trace_embedding_subjects(texts[part], outputs, mark, KEYS, _null_list(k))
        assert traced.subject is None and traced.rows > 0
        raw.extend(traced.log10_p_values.values())
    assert len(raw) == 1000
    p = 10 ** np.array(raw)
    assert np.sum(p <= DEFAULT_TRACE_THRESHOLD / 100) == 0  # no false naming at 1e-6 corrected
    low, high = LOOSE_COUNT_RANGE
    assert low <= np.sum(p <= LOOSE_LEVEL) <= high, np.sum(p <= LOOSE_LEVEL)


# -- text: the causal-LM handler with the per-subject processor ---------------------------------------------

V = 200
PER_SUBJECT_TEXT = {"watermark": {"text": {"gamma": 0.25, "delta": 2.0, "per_subject": True}}}


def _lm(section: dict[str, Any] | None = None) -> ModelHandler:
    """A fairly flat bigram LM (as in test_output_protection), its green list attached by the boot code."""
    logits = torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 0.5
    handler = load_handler("causal-lm:bigram", {"logits": logits},
                           {"nitrovault.config": json.dumps({"vocab_size": V, "max_new_tokens": 400})})
    config = with_protection(PER_SUBJECT_TEXT if section is None else section)
    attach_text_watermark(config, handler, SealedExtras(watermark_keys=KEYS))
    return handler


def _generate(handler: ModelHandler, subject: str, rows: int, length: int, seed: int) -> list[list[int]]:
    """Each row's prompt token and continuation, generated as the server does (Forward, on this thread)."""
    guard = OutputGuard(with_protection({}).protection, SealedExtras())
    prompts = torch.arange(rows, dtype=torch.int64)[:, None] + seed
    call = InferCall({"input_ids": prompts, "max_new_tokens": torch.tensor(length),
                      "seed": torch.tensor(seed)}, subject, GuardNotes())
    answer = Forward(lambda: (handler, guard))([call])[0]
    assert isinstance(answer, dict), answer
    return [[int(p), *row] for p, row in zip(prompts[:, 0].tolist(), answer["tokens"].tolist(), strict=True)]


def _trace(tokens: list[int]) -> Any:
    return trace_text_subjects(tokens, KEYS, vocab_size=V, gamma=0.25, subjects=SUBJECTS)


def test_generated_text_names_its_subject_and_a_bigram_copy_of_it_does_too() -> None:
    handler = _lm()
    one = _generate(handler, LEAKER, 1, 200, 1)[0]
    traced = _trace(one)
    assert traced.subject == LEAKER and traced.log10_p_value < -10, traced.as_dict()
    # a copy: bigram counts fitted on the subject's generated text, then sampled
    training = _generate(handler, LEAKER, 20, 200, 2)
    counts = np.full((V, V), 0.01)
    for row in training:
        np.add.at(counts, (row[:-1], row[1:]), 1.0)
    copy = torch.from_numpy(np.log(counts / counts.sum(1, keepdims=True)))
    g = torch.Generator().manual_seed(3)
    sample = [0]
    for _ in range(400):
        sample.append(int(torch.multinomial(torch.softmax(copy[sample[-1]], -1), 1, generator=g)))
    copied = _trace(sample)
    assert copied.subject == LEAKER and copied.log10_p_value < -8, copied.as_dict()


def test_text_calibration_over_1000_null_tests() -> None:
    """5 unmarked, 3 unlisted subjects' and 2 model-level-marked samples of 200 tokens x 100 subjects."""
    unmarked, model_level = _lm({}), _lm({"watermark": {"text": {"gamma": 0.25, "delta": 2.0}}})
    per_subject = _lm()
    samples = [*_generate(unmarked, "anyone", 5, 200, 10), *_generate(model_level, "anyone", 2, 200, 20)]
    samples += [_generate(per_subject, UNLISTED[k], 1, 200, 30 + k)[0] for k in range(3)]
    raw: list[float] = []
    for k, tokens in enumerate(samples):
        traced = trace_text_subjects(tokens, KEYS, vocab_size=V, gamma=0.25, subjects=_null_list(k))
        assert traced.subject is None, traced.as_dict()
        raw.extend(traced.log10_p_values.values())
    assert len(raw) == 1000
    p = 10 ** np.array(raw)
    assert np.sum(p <= DEFAULT_TRACE_THRESHOLD / 100) == 0
    assert np.sum(p <= LOOSE_LEVEL) <= LOOSE_COUNT_RANGE[1]  # the exact binomial test is conservative


# -- through the enclave's gRPC server: two subjects, their own tokens --------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pki") / "pki"


@pytest.fixture
def serve(pki: Path) -> Iterator[Any]:
    """Start a server (the harness of test_output_protection) serving ``handler`` with ``outputs``."""
    nsm = make_local_nsm(pki, PCRS)
    started: list[Served] = []

    def start(section: dict[str, Any], handler: ModelHandler, outputs: OutputGuard) -> Served:
        served = Served(nsm, section, load_root(pki / "root.pem"), handler=handler.kind)
        started.append(served)
        served.server.run(served.server.server.serve(
            ServingModel(handler=handler, sealed_digest=DIGEST, outputs=outputs)))
        return served

    yield start
    for s in started:
        s.server.close()


TWO = ["alice@example.com", "bob@example.com"]


def _token(subject: str) -> str:
    return ISSUER.issue(subject, ["infer:*", "embed:*", "generate:*"], 3600)


def test_two_subjects_over_grpc_get_text_that_traces_to_themselves(serve: Any) -> None:
    handler = _lm()
    served = serve(PER_SUBJECT_TEXT, handler, OutputGuard(with_protection(PER_SUBJECT_TEXT).protection,
                                                          SealedExtras(watermark_keys=KEYS)))
    for subject in TWO:
        with served.client(_token(subject)) as client:
            tokens = client.infer({"input_ids": np.array([[1]], dtype=np.int64),
                                   "max_new_tokens": np.array([200], dtype=np.int64)})["tokens"]
        traced = trace_text_subjects([1, *(int(t) for t in tokens[0])], KEYS, vocab_size=V,
                                     subjects=[*TWO, *SUBJECTS])
        assert traced.subject == subject, traced.as_dict()
    records = served.records()
    assert [r["subject"] for r in records] == TWO and all("protection" not in r for r in records)


def test_two_subjects_streaming_generate_get_text_that_traces_to_themselves(pki: Path, tiny_lm: Path) -> None:
    """``Generate`` (streamed text, the tiny GPT-2 with its tokenizer): the owner retokenizes the text."""
    handler = lm_handler(tiny_lm)
    config = lm_config(protection={"watermark": {"text": {"gamma": 0.25, "delta": 4.0, "per_subject": True}}})
    keys = derive_watermark_keys(SECRET, config.model_id)  # what the boot derives for this model
    attach_text_watermark(config, handler, SealedExtras(watermark_keys=keys))
    assert handler.tokenizer is not None
    served = GenerateServer(make_local_nsm(pki, PCRS), handler, config)
    try:
        for subject in TWO:
            with served.client(_token(subject)) as client:
                text = client.generate("The", max_new_tokens=120, seed=5, temperature=1.0).text
            ids = handler.tokenizer.encode("The" + text).ids
            traced = trace_text_subjects(ids, keys, vocab_size=handler.vocab_size, subjects=[*TWO, *SUBJECTS])
            assert traced.subject == subject, traced.as_dict()
    finally:
        served.close()


def test_two_subjects_over_grpc_get_embeddings_that_trace_to_themselves_and_nothing_is_audited(
        serve: Any, minilm: ModelHandler, guard: OutputGuard, corpus: tuple[list[str], np.ndarray]) -> None:
    texts = corpus[0][:80]
    served = serve(PER_SUBJECT_EMBEDDINGS, minilm, guard)
    unmarked = serve({}, minilm, OutputGuard(with_protection({}).protection, SealedExtras()))
    for subject in TWO:
        for server in (served, unmarked):
            with server.client(_token(subject)) as client:
                answers = np.concatenate([client.embed(texts[i:i + 8]) for i in range(0, len(texts), 8)])
            traced = trace_embedding_subjects(texts, answers, _mark(guard), KEYS, [*TWO, *SUBJECTS])
            assert traced.subject == (subject if server is served else None), traced.as_dict()
    # the audit records of marked calls are those of unmarked ones: the same fields, no protection object
    marked_records, plain_records = served.records(), unmarked.records()
    assert len(marked_records) == len(plain_records) == 20
    assert [sorted(r) for r in marked_records] == [sorted(r) for r in plain_records]
    assert all("protection" not in r for r in marked_records)


# -- the CLI: nitrovault watermark trace on real files ------------------------------------------------------

runner = CliRunner()


def _trace_cli(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    key = tmp_path / "owner.key"
    key.write_text(SECRET.hex() + "\n")
    result = runner.invoke(app, ["trace", "--key-file", str(key), "--model-id", CONFIG.model_id, *args,
                                 "--json"])
    assert "Traceback" not in result.output
    found = json.loads(result.stdout) if result.exit_code in (0, 1) else None
    return result.exit_code, found, result.output


def _write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _jsonl(path: Path, texts: Sequence[str], vectors: np.ndarray) -> Path:
    return _write_lines(path, [json.dumps({"text": t, "embedding": v.tolist()})
                               for t, v in zip(texts, vectors, strict=True)])


def test_the_trace_command_names_the_subject_or_nobody(
        tmp_path: Path, guard: OutputGuard, corpus: tuple[list[str], np.ndarray]) -> None:
    texts, clean = corpus[0][:150], corpus[1][:150]
    subjects = _write_lines(tmp_path / "subjects.txt", ["", *SUBJECTS, "  "])  # blank lines are skipped
    candidates = tmp_path / "words.json"
    candidates.write_text(json.dumps(demo_watermark_candidates()))  # as sealed: a JSON list
    words = _write_lines(tmp_path / "words.txt", demo_watermark_candidates())
    leaked = _jsonl(tmp_path / "leaked.jsonl", texts, _served(guard, LEAKER, texts, clean))
    for listed in (candidates, words):
        code, found, _ = _trace_cli(tmp_path, "--subjects", str(subjects), "--embeddings", str(leaked),
                                    "--candidates", str(listed))
        assert code == 0 and found is not None and found["subject"] == LEAKER and found["subjects"] == 100
    code, found, _ = _trace_cli(tmp_path, "--subjects", str(subjects), "--candidates", str(words),
                                "--embeddings", str(_jsonl(tmp_path / "clean.jsonl", texts, clean)))
    assert code == 1 and found is not None and found["subject"] is None

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"tokens": _generate(_lm(), LEAKER, 1, 200, 5)[0]}))
    code, found, _ = _trace_cli(tmp_path, "--subjects", str(subjects), "--tokens", str(ids),
                                "--vocab-size", str(V))
    assert code == 0 and found is not None and found["subject"] == LEAKER
    ids.write_text(json.dumps(_generate(_lm({}), LEAKER, 1, 200, 5)[0]))
    code, found, _ = _trace_cli(tmp_path, "--subjects", str(subjects), "--tokens", str(ids),
                                "--vocab-size", str(V))
    assert code == 1 and found is not None and found["subject"] is None
    # the human-readable line
    key = tmp_path / "owner.key"
    plain = runner.invoke(app, ["trace", "--key-file", str(key), "--model-id", CONFIG.model_id,
                                "--subjects", str(subjects), "--embeddings", str(leaked),
                                "--candidates", str(words)])
    assert plain.exit_code == 0 and plain.stdout.startswith(f"subject {LEAKER!r}: corrected p=")


def test_the_trace_command_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    subjects = _write_lines(tmp_path / "subjects.txt", SUBJECTS[:3])
    words = _write_lines(tmp_path / "words.txt", demo_watermark_candidates())
    good = {"text": "a text", "embedding": [0.1] * 8}
    cases: dict[str, tuple[list[str], str]] = {}

    def case(name: str, message: str, *args: str) -> None:
        cases[name] = (list(args), message)

    def embeddings_file(name: str, lines: Sequence[str]) -> str:
        return str(_write_lines(tmp_path / name, lines))

    base = ["--subjects", str(subjects), "--candidates", str(words)]
    case("corrupt jsonl", "line 2 is not JSON",
         *base, "--embeddings", embeddings_file("corrupt.jsonl", [json.dumps(good), "{not json"]))
    case("a row without an embedding", "line 1 is not",
         *base, "--embeddings", embeddings_file("fields.jsonl", [json.dumps({"text": "x"})]))
    case("wrong dims", "line 2 has 7 dimensions",
         *base, "--embeddings", embeddings_file("dims.jsonl", [json.dumps(good), json.dumps(
             {"text": "b", "embedding": [0.1] * 7})]))
    case("one dimension", "at least 2 dimensions",
         *base, "--embeddings", embeddings_file("one.jsonl", [json.dumps({"text": "b", "embedding": [1.0]})]))
    case("no rows", "no rows", *base, "--embeddings", embeddings_file("empty.jsonl", []))
    case("empty subject list", "subject list is empty",
         "--subjects", str(_write_lines(tmp_path / "none.txt", ["", " "])), "--candidates", str(words),
         "--embeddings", embeddings_file("ok.jsonl", [json.dumps(good)]))
    case("duplicate subjects", "more than once: b",
         "--subjects", str(_write_lines(tmp_path / "dup.txt", ["a", "b", "b"])), "--candidates", str(words),
         "--embeddings", embeddings_file("ok2.jsonl", [json.dumps(good)]))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([1, 2, V]))
    case("token out of vocab", "outside the vocabulary",
         "--subjects", str(subjects), "--tokens", str(ids), "--vocab-size", str(V))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2,")
    case("tokens not JSON", "not a JSON file",
         "--subjects", str(subjects), "--tokens", str(bad_json), "--vocab-size", str(V))
    case("no vocab size", "--tokens needs --vocab-size", "--subjects", str(subjects), "--tokens", str(ids))
    case("no candidates", "--embeddings needs --candidates",
         "--subjects", str(subjects), "--embeddings", embeddings_file("ok3.jsonl", [json.dumps(good)]))
    case("both inputs", "exactly one of", *base, "--tokens", str(ids), "--vocab-size", str(V),
         "--embeddings", embeddings_file("ok4.jsonl", [json.dumps(good)]))
    case("neither input", "exactly one of", *base)
    bad_words = tmp_path / "words-bad.json"
    bad_words.write_text("[1, 2]")
    case("candidates not strings", "list of strings", "--subjects", str(subjects),
         "--candidates", str(bad_words), "--embeddings", embeddings_file("ok5.jsonl", [json.dumps(good)]))
    for name, (args, message) in cases.items():
        code, _, output = _trace_cli(tmp_path, *args)
        assert code == 2, (name, output)
        assert message in " ".join(output.replace("│", " ").split()), (name, output)  # unwrap rich's box
