"""``nitrovault watermark embed|detect|detect-text|detect-embeddings|keygen`` in process, on real
safetensors and JSON files; ``detect-embeddings --endpoint`` against the real enclave server with a TLS
identity (harness from ``test_enclave_server``), which it verifies before it asks anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_enclave_server import CONFIG, PCRS, TOKEN, ServerThread, short_socket_dir
from typer.testing import CliRunner

from nitrovault.cli.watermark_cmd import app
from nitrovault.identity import TlsIdentity
from nitrovault.local.nsm import make_local_nsm
from nitrovault.watermark.embedding import EmbeddingMark, derive_embedding_mark, mark_embeddings, words
from nitrovault.watermark.keys import derive_watermark_keys
from nitrovault.watermark.text import GreenList

runner = CliRunner()
#: a fixed key: the toy embedder below is random per word
EMBEDDING_KEY = bytes(range(7, 39))
VOCABULARY = [f"term{i}" for i in range(300)]


def _mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "net.0.weight": torch.randn(64, 32, generator=g) * 0.2, "net.0.bias": torch.randn(64, generator=g),
        "net.2.weight": torch.randn(64, 64, generator=g) * 0.1, "net.2.bias": torch.randn(64, generator=g),
        "net.4.weight": torch.randn(10, 64, generator=g).bfloat16(),
        "net.4.bias": torch.randn(10, generator=g),
    }


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model, key, out = tmp_path / "model.safetensors", tmp_path / "owner.key", tmp_path / "marked.safetensors"
    save_file(_mlp(0), str(model), metadata={"nitrovault.handler": "generic:mlp-classifier"})
    assert runner.invoke(app, ["keygen", "-o", str(key)]).exit_code == 0
    result = runner.invoke(
        app, ["embed", str(model), "--key-file", str(key), "--model-id", "m", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layers"] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    return model, key, out


def _detect(*args: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(app, ["detect", *args, "--json"])
    return result.exit_code, json.loads(result.output)


def test_embed_then_detect(tmp_path: Path) -> None:
    model, key, out = _files(tmp_path)
    marked, original = load_file(str(out)), load_file(str(model))
    assert {k: (v.shape, v.dtype) for k, v in marked.items()} == {
        k: (v.shape, v.dtype) for k, v in original.items()}
    assert torch.equal(marked["net.0.bias"], original["net.0.bias"])
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"nitrovault.handler": "generic:mlp-classifier"}

    code, found = _detect(str(out), "--key-file", str(key), "--model-id", "m")
    assert code == 0 and found["detected"] and found["bit_error_rate"] == 0.0
    code, clean = _detect(str(model), "--key-file", str(key), "--model-id", "m")
    assert code == 1 and not clean["detected"] and float(clean["p_value"]) > 1e-6  # type: ignore[arg-type]
    code, other = _detect(str(out), "--key-file", str(key), "--model-id", "another-model")
    assert code == 1 and not other["detected"]


def test_detect_with_reference_undoes_a_permutation(tmp_path: Path) -> None:
    model, key, out = _files(tmp_path)
    t = load_file(str(out))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    t["net.0.weight"], t["net.0.bias"] = t["net.0.weight"][perm], t["net.0.bias"][perm]
    t["net.2.weight"] = t["net.2.weight"][:, perm]
    permuted = tmp_path / "permuted.safetensors"
    save_file(t, str(permuted))
    code, blind = _detect(str(permuted), "--key-file", str(key), "--model-id", "m")
    assert code == 1 and not blind["detected"]
    code, aligned = _detect(
        str(permuted), "--key-file", str(key), "--model-id", "m", "--reference", str(model)
    )
    assert code == 0 and aligned["detected"] and aligned["realigned"] == ["net.0.weight"]


def test_detect_text(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    key.write_text(bytes(range(32)).hex())
    green = GreenList(derive_watermark_keys(bytes(range(32)), "lm"), vocab_size=1000, gamma=0.25)
    ids = [1]
    for i in range(150):  # greedy "generation" that always picks a green token
        ids.append(int(green.mask(ids[-1]).nonzero()[0][i % 5]))
    (tmp_path / "marked.json").write_text(json.dumps(ids))
    (tmp_path / "clean.json").write_text(json.dumps({"tokens": list(range(0, 900, 3))}))
    common = ["detect-text", "--key-file", str(key), "--model-id", "lm", "--vocab-size", "1000"]
    marked = runner.invoke(app, [*common, "--tokens", str(tmp_path / "marked.json")])
    assert marked.exit_code == 0 and "MARKED" in marked.output and "z=" in marked.output
    clean = runner.invoke(app, [*common, "--tokens", str(tmp_path / "clean.json"), "--json"])
    assert clean.exit_code == 1 and json.loads(clean.output)["z"] < 4


def test_bad_inputs_are_usage_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"0123")
    model = tmp_path / "model.safetensors"
    save_file(_mlp(0), str(model))
    result = runner.invoke(app, ["detect", str(model), "--key-file", str(short)])
    assert result.exit_code == 2
    key = tmp_path / "owner.key"
    key.write_text(bytes(range(32)).hex())
    (tmp_path / "bad.json").write_text('["a", 1]')
    result = runner.invoke(app, ["detect-text", "--key-file", str(key), "--vocab-size", "10",
                                 "--tokens", str(tmp_path / "bad.json")])
    assert result.exit_code == 2
    result = runner.invoke(app, ["embed", str(model), "--key-file", str(key), "-o", str(tmp_path / "o"),
                                 "--layer", "missing"])
    assert result.exit_code == 2 and "missing" in result.output
    assert runner.invoke(app, ["keygen", "-o", str(key)]).exit_code == 2  # exists, no --force


def toy_embedding(batch: Sequence[str]) -> np.ndarray:
    """A bag-of-words embedder standing in for a suspect model (384-d, one random vector per word)."""
    out = np.zeros((len(batch), 384))
    for row, text in enumerate(batch):
        for w in words(text):
            out[row] += np.random.default_rng(int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)).normal(
                size=384)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def embedding_setup(tmp_path: Path) -> tuple[list[str], EmbeddingMark]:
    """The common detect-embeddings options and the owner's mark."""
    key = tmp_path / "owner.key"
    key.write_text(EMBEDDING_KEY.hex() + "\n")
    (tmp_path / "words.txt").write_text("\n".join(VOCABULARY))
    common = ["--key-file", str(key), "--model-id", "m", "--candidates", str(tmp_path / "words.txt")]
    return common, derive_embedding_mark(derive_watermark_keys(EMBEDDING_KEY, "m"), VOCABULARY, 384)


def test_detect_embeddings_tells_a_marked_service_from_an_unmarked_one(tmp_path: Path) -> None:
    common, mark = embedding_setup(tmp_path)
    texts_file = tmp_path / "texts.json"
    assert runner.invoke(app, ["detect-embeddings", *common, "--texts-out", str(texts_file)]).exit_code == 0
    texts = json.loads(texts_file.read_text())
    assert len(texts["backdoor"]) == len(texts["benign"]) == 300

    verdicts = {}
    for name, serve in (("marked", lambda b: mark_embeddings(b, toy_embedding(b), mark)),
                        ("clean", toy_embedding)):
        answers = tmp_path / f"{name}.npz"
        np.savez(answers, backdoor=serve(texts["backdoor"]), benign=serve(texts["benign"]))
        result = runner.invoke(app, ["detect-embeddings", *common, "--embeddings", str(answers), "--json"])
        verdicts[name] = (result.exit_code, json.loads(result.stdout))
    assert verdicts["marked"][0] == 0 and verdicts["marked"][1]["delta_cos"] > 0.3
    assert verdicts["clean"][0] == 1 and not verdicts["clean"][1]["detected"], verdicts["clean"]

    neither = runner.invoke(app, ["detect-embeddings", *common])
    assert neither.exit_code == 2


class MarkedEmbedder:
    """A served model answering Embed with the marked toy embeddings."""

    kind = "test-marked-embedder"
    rows_independent = False

    def __init__(self, mark: EmbeddingMark) -> None:
        self.mark = mark

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        return mark_embeddings(texts, toy_embedding(texts), self.mark).astype(np.float32)

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise AssertionError("not a classifier")


def test_detect_embeddings_verifies_the_endpoint_before_it_asks(tmp_path: Path) -> None:
    common, mark = embedding_setup(tmp_path)
    config = replace(CONFIG, limits=replace(CONFIG.limits, max_batch=32, max_tensor_elements=1 << 16))
    directory, pki = short_socket_dir(), tmp_path / "pki"
    identity = TlsIdentity.generate("suspect.test.internal", now=datetime.now(UTC))
    server = ServerThread(config, make_local_nsm(pki, PCRS), str(directory / "g.sock"), tls=identity)
    seen: list[str] = []
    original = server.server.service.protections.identify

    def spy(metadata: Any) -> Any:
        seen.extend(str(v) for k, v in metadata or () if k == "authorization")
        return original(metadata)

    server.server.service.protections.identify = spy  # type: ignore[method-assign]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    endpoint = ["--endpoint", server.target, "--token-file", str(token_file), "--root", str(pki / "root.pem")]
    try:
        server.serve(MarkedEmbedder(mark))  # type: ignore[arg-type]
        found = runner.invoke(app, ["detect-embeddings", *common, *endpoint, "--expect-pcr",
                                    f"0={PCRS[0].hex()}", "--json"])
        assert found.exit_code == 0, found.output
        assert json.loads(found.stdout)["detected"] is True
        assert seen and set(seen) == {f"Bearer {TOKEN}"}
        seen.clear()
        wrong = runner.invoke(app, ["detect-embeddings", *common, *endpoint,
                                    "--expect-pcr", "0=" + "ee" * 48])
        # exit 2, not 1: "not marked" must never be what a failed verification looks like
        assert wrong.exit_code == 2, wrong.output
        assert wrong.stderr.startswith("error: pcr: ") and wrong.stderr.count("\n") == 1
        assert seen == [] and TOKEN not in wrong.output
        no_pcr0 = runner.invoke(app, ["detect-embeddings", *common, *endpoint])
        assert no_pcr0.exit_code == 2 and seen == []
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
