"""Function-preserving hardening (nitrovault/owner/harden.py): the same function for every architecture we
serve, other units, deterministic under a secret, typed errors for what it cannot harden."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch
from test_transformer_lm import gpt2, llama, sealed

from enclave_app.models import load_handler
from enclave_app.models.generic import MLPClassifier
from nitrovault.errors import ConfigError
from nitrovault.local.models import demo_model_source
from nitrovault.owner.harden import DEFAULT_TRAPS, Model, align, alignment_score, harden, reorder

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
#: float32 outputs of a hardened copy may differ from the original's by this much (issue 15)
MAX_ABS_DIFF = 1e-4
#: a hardened copy as it is lines up with its original no better than this (1.0 = unit for unit)
MAX_ALIGNMENT_AFTER = 0.2


def arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def torch_tensors(model: Model) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.tensors.items()}


def mlp(seed: int = 0, hidden: tuple[int, ...] = (128, 128), features: int = 64) -> Model:
    torch.manual_seed(seed)
    module = MLPClassifier(features, list(hidden), 10)
    config = {"in_features": features, "hidden": list(hidden), "classes": 10}
    metadata = {"nitrovault.handler": "generic:mlp-classifier", "nitrovault.config": json.dumps(config)}
    return Model.from_file_parts(arrays(module.state_dict()), metadata)


@cache
def minilm() -> Model:
    from safetensors.torch import load_file

    source, metadata = demo_model_source()
    return Model.from_file_parts(arrays(load_file(source)), metadata)


def lm(arch: str) -> Model:
    tensors, metadata = sealed(gpt2() if arch == "gpt2" else llama())
    return Model.from_file_parts(arrays(tensors), {**metadata, "nitrovault.handler": f"causal-lm:{arch}"})


def outputs(model: Model) -> np.ndarray:
    """The served function on fixed held-out inputs, through the enclave's own handler code."""
    handler = load_handler(model.architecture, torch_tensors(model), model.file_metadata())
    with torch.inference_mode():
        if model.architecture == "generic:mlp-classifier":
            x = torch.from_numpy(np.random.default_rng(7).normal(size=(300, 64)).astype(np.float32))
            return handler.infer({"x": x})["logits"].numpy()
        if model.architecture == "sentence-embedding":
            texts = [f"held-out sentence {i} about {w}" for i, w in enumerate(
                ["sealed weights", "a hostile parent", "the key policy", "cats", "rain", "PCR0"] * 4)]
            return handler.embed(texts, normalize=False)
        ids = torch.from_numpy(np.random.default_rng(7).integers(0, 300, size=(4, 24)))
        logits, _ = handler.module.step(ids, None)  # type: ignore[attr-defined]
        return np.asarray(logits.numpy())


ARCHITECTURES: dict[str, Callable[[], Model]] = {
    "mlp-classifier": mlp, "sentence-embedding": minilm,
    "gpt2": lambda: lm("gpt2"), "llama": lambda: lm("llama"),
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # float reductions in a fixed order: differences are the transform's own


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_hardened_copy_computes_the_same_function_with_other_units(name: str) -> None:
    reference = ARCHITECTURES[name]()
    before = {k: v.copy() for k, v in reference.tensors.items()}
    hardened, report = harden(reference, SECRET)
    a, b = outputs(reference), outputs(hardened)
    assert float(np.max(np.abs(a - b))) <= MAX_ABS_DIFF
    assert np.array_equal(a.argmax(axis=-1), b.argmax(axis=-1))
    assert alignment_score(reference.tensors, reference) == pytest.approx(1.0)
    assert alignment_score(hardened.tensors, reference) <= MAX_ALIGNMENT_AFTER
    assert report.trap_units == DEFAULT_TRAPS * sum(1 for g in reference.groups() if g.takes_traps) > 0
    assert all(np.array_equal(reference.tensors[k], v) for k, v in before.items())  # input untouched
    # matching against the original undoes it (what a thief holding the base can do too: docs/hardening.md)
    aligned, _ = align(hardened.tensors, reference)
    assert alignment_score(aligned, reference) == pytest.approx(1.0, abs=1e-6)


def test_traps_change_the_config_and_add_units_whose_outgoing_weights_are_zero() -> None:
    reference = mlp()
    hardened, _ = harden(reference, SECRET, traps=3)
    assert hardened.config["hidden"] == [131, 131] and reference.config["hidden"] == [128, 128]
    out = hardened.tensors["net.2.weight"]  # rows: layer-2 units, columns: layer-1 units
    assert int(np.sum(np.all(out == 0, axis=0))) == 3  # three layer-1 units feed nothing
    assert hardened.tensors["net.0.weight"].shape == (131, 64)


def test_the_secret_decides_the_copy_and_makes_it_again() -> None:
    reference = mlp()
    a, _ = harden(reference, SECRET)
    again, _ = harden(reference, SECRET)
    other, _ = harden(reference, OTHER)
    assert all(np.array_equal(a.tensors[k], again.tensors[k]) for k in a.tensors)
    assert not np.array_equal(a.tensors["net.0.weight"], other.tensors["net.0.weight"])


def test_tensors_outside_the_unit_groups_are_left_as_they_are() -> None:
    reference = minilm()
    hardened, _ = harden(reference, SECRET, traps=0)
    untouched = [k for k in reference.tensors if "LayerNorm" in k or k.startswith("embeddings.")]
    assert untouched and all(hardened.tensors[k] is reference.tensors[k] for k in untouched)
    assert hardened.config["intermediate_size"] == reference.config["intermediate_size"]


def test_a_re_permutation_by_the_thief_is_still_the_same_function() -> None:
    """The sweep's re-permutation attack (reorder) is itself function preserving: it is a fair attack."""
    hardened, _ = harden(mlp(), SECRET)
    moved = dict(hardened.tensors)
    rng = np.random.default_rng(3)
    for group in hardened.groups():
        reorder(moved, group, group.units, rng.permutation(group.units))
    assert float(np.max(np.abs(outputs(hardened) - outputs(Model(moved, hardened.architecture,
                                                                  hardened.config))))) <= MAX_ABS_DIFF


@pytest.mark.parametrize(("metadata", "message"), [
    ({"nitrovault.handler": "generic:resnet", "nitrovault.config": "{}"}, "hardening supports"),
    ({"nitrovault.config": "{}"}, "hardening supports"),
    ({"nitrovault.handler": "generic:mlp-classifier", "nitrovault.config": "[1, 2]"}, "not a JSON object"),
    ({"nitrovault.handler": "generic:mlp-classifier", "nitrovault.config": "{nope"}, "not a JSON object"),
])
def test_a_model_hardening_cannot_read_is_refused_with_a_clear_error(metadata: dict[str, str],
                                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Model.from_file_parts(mlp().tensors, metadata)


def test_tensors_that_do_not_fit_the_config_are_refused() -> None:
    reference = mlp()
    missing = Model({k: v for k, v in reference.tensors.items() if k != "net.2.weight"},
                    reference.architecture, reference.config)
    with pytest.raises(ConfigError, match=r"no tensor 'net\.2\.weight'"):
        harden(missing, SECRET)
    wrong = Model(reference.tensors, reference.architecture, {**reference.config, "hidden": [100, 128]})
    with pytest.raises(ConfigError, match="the config implies"):
        harden(wrong, SECRET)
    integer = dict(reference.tensors, **{"net.0.bias": np.zeros(128, dtype=np.int64)})
    with pytest.raises(ConfigError, match="not a floating tensor"):
        harden(Model(integer, reference.architecture, reference.config), SECRET)
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        harden(reference, b"short")


def test_a_suspect_of_another_shape_is_refused_by_the_alignment() -> None:
    with pytest.raises(ConfigError, match=r"the suspect's 'net.0.weight' has shape \[128, 32\]"):
        align(mlp(features=32).tensors, mlp())
    with pytest.raises(ConfigError, match="no tensor"):
        align({k: v for k, v in mlp().tensors.items() if not k.startswith("net.4")}, mlp())
