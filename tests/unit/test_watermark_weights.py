"""Weight watermark: round trips, calibration on independent unmarked models, each robustness attack at a
setting the mark survives, and the re-alignment step that defeats hidden-unit permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import derive_watermark_keys, parse_key_file
from nitrovault.watermark.weights import (
    DEFAULT_P_THRESHOLD,
    align_to_reference,
    binomial_p_value,
    detect_weight_mark,
    embed_weight_mark,
)

KEYS = derive_watermark_keys(bytes(range(32)), "mlp")
OTHER = derive_watermark_keys(bytes(range(1, 33)), "mlp")
Tensors = dict[str, np.ndarray]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1200, 32, generator=g)
    teacher = torch.Generator().manual_seed(99)  # one fixed task for every model
    w1 = torch.randn(32, 6, generator=teacher)
    return x, (x @ w1 + 0.5 * (x[:, :6] ** 2)).argmax(1)


X_TRAIN, Y_TRAIN = _data(1)
X_TEST, Y_TEST = _data(2)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 6))


def _train(net: nn.Module, epochs: int, seed: int, lr: float = 1e-2) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(X_TRAIN)).split(200):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X_TRAIN[idx]), Y_TRAIN[idx]).backward()
            opt.step()


def _model(seed: int) -> Tensors:
    torch.manual_seed(seed)
    net = _net()
    _train(net, 15, seed)
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _load(tensors: Tensors) -> nn.Sequential:
    net = _net()
    net.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()})
    return net


def _accuracy(tensors: Tensors) -> float:
    with torch.no_grad():
        return float((_load(tensors)(X_TEST).argmax(1) == Y_TEST).float().mean())


@pytest.fixture(scope="module")
def original() -> Tensors:
    return _model(0)


@pytest.fixture(scope="module")
def marked(original: Tensors) -> Tensors:
    return embed_weight_mark(original, KEYS)[0]


def test_round_trip_detects_with_zero_bit_errors(original: Tensors, marked: Tensors) -> None:
    result = detect_weight_mark(marked, KEYS)
    assert result.detected and result.bit_error_rate == 0.0
    assert result.p_value == pytest.approx(0.5**64)
    assert result.mean_margin > 1.5


def test_embedding_is_deterministic_and_leaves_other_tensors(original: Tensors, marked: Tensors) -> None:
    again, report = embed_weight_mark(original, KEYS)
    assert all(np.array_equal(again[k], marked[k]) for k in marked)
    assert report.layers == ("0.weight", "2.weight", "4.weight")
    assert again["0.bias"] is original["0.bias"]
    assert 0 < report.relative_change < 0.3


def test_bounded_accuracy_cost(original: Tensors, marked: Tensors) -> None:
    assert abs(_accuracy(marked) - _accuracy(original)) <= 0.03
    assert _accuracy(original) > 0.7  # the task is learnt, so the comparison means something


def test_wrong_key_does_not_detect(marked: Tensors) -> None:
    assert not detect_weight_mark(marked, OTHER).detected
    assert not detect_weight_mark(marked, derive_watermark_keys(bytes(range(32)), "other-model")).detected


def test_independent_unmarked_models_stay_below_threshold(original: Tensors) -> None:
    p_values = []
    for seed in range(1, 6):  # independently initialised and trained
        model = _model(seed)
        p_values.append(detect_weight_mark(model, KEYS).p_value)
        # re-aligning an unrelated model to the owner's reference must not manufacture a mark
        p_values.append(detect_weight_mark(model, KEYS, reference=original).p_value)
    assert min(p_values) > DEFAULT_P_THRESHOLD
    assert detect_weight_mark(original, KEYS).p_value > DEFAULT_P_THRESHOLD


def test_binomial_p_value() -> None:
    assert binomial_p_value(64, 64) == pytest.approx(2.0**-64)
    assert binomial_p_value(0, 64) == pytest.approx(1.0)
    assert binomial_p_value(32, 64) == pytest.approx(0.549, abs=1e-3)


# -- the robustness sweep, one surviving setting each --------------------------------------------------------


def _prune(tensors: Tensors, fraction: float) -> Tensors:
    out = dict(tensors)
    for name, t in tensors.items():
        if t.ndim == 2:
            cut = np.quantile(np.abs(t), fraction)
            out[name] = np.where(np.abs(t) < cut, 0, t).astype(t.dtype)
    return out


def test_survives_pruning_half_the_weights(marked: Tensors) -> None:
    result = detect_weight_mark(_prune(marked, 0.5), KEYS)
    assert result.detected and result.bit_error_rate < 0.1


def test_survives_int8_quantisation(marked: Tensors) -> None:
    quantised = {}
    for name, t in marked.items():
        scale = np.abs(t).max() / 127
        quantised[name] = (np.clip(np.round(t / scale), -127, 127) * scale).astype(np.float32)
    assert detect_weight_mark(quantised, KEYS).bit_error_rate == 0.0


def test_survives_gaussian_noise(marked: Tensors) -> None:
    rng = np.random.default_rng(0)
    noisy = {k: (v + rng.normal(0, 0.5 * np.sqrt(np.mean(v**2)), v.shape)).astype(np.float32)
             for k, v in marked.items()}
    assert detect_weight_mark(noisy, KEYS).detected


def test_survives_fine_tuning(marked: Tensors) -> None:
    net = _load(marked)
    _train(net, 3, seed=7, lr=1e-3)
    tuned = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    assert detect_weight_mark(tuned, KEYS).detected


def _permute(tensors: Tensors, seed: int) -> Tensors:
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for layer, following in (("0", "2"), ("2", "4")):
        perm = rng.permutation(out[f"{layer}.weight"].shape[0])
        out[f"{layer}.weight"] = out[f"{layer}.weight"][perm]
        out[f"{layer}.bias"] = out[f"{layer}.bias"][perm]
        out[f"{following}.weight"] = out[f"{following}.weight"][:, perm]
    return out


def test_permutation_is_function_preserving_and_removes_the_mark_without_realignment(marked: Tensors) -> None:
    permuted = _permute(marked, 3)
    with torch.no_grad():
        assert torch.allclose(_load(permuted)(X_TEST), _load(marked)(X_TEST), atol=1e-5)
    assert not detect_weight_mark(permuted, KEYS).detected


def test_realignment_to_the_reference_defeats_permutation(original: Tensors, marked: Tensors) -> None:
    permuted = _permute(marked, 3)
    result = detect_weight_mark(permuted, KEYS, reference=original)
    assert result.detected and result.bit_error_rate == 0.0
    assert result.realigned == ("0.weight", "2.weight")


def test_realignment_survives_permutation_plus_fine_tuning(original: Tensors, marked: Tensors) -> None:
    net = _load(_permute(marked, 4))
    _train(net, 2, seed=8, lr=1e-3)
    suspect = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    assert detect_weight_mark(suspect, KEYS, reference=original).detected


def test_alignment_of_an_unpermuted_model_is_the_identity(original: Tensors, marked: Tensors) -> None:
    aligned, moved = align_to_reference(marked, original)
    assert moved == ()
    assert all(np.array_equal(aligned[k], marked[k]) for k in marked)


# -- refusals ------------------------------------------------------------------------------------------------


def test_suspect_missing_a_marked_tensor_is_refused(original: Tensors, marked: Tensors) -> None:
    partial = {k: v for k, v in marked.items() if k != "2.weight"}
    with pytest.raises(ConfigError, match="lacks"):
        detect_weight_mark(partial, KEYS, reference=original)


def test_suspect_with_other_shapes_is_refused(original: Tensors) -> None:
    other = dict(original, **{"4.weight": np.zeros((6, 65), np.float32)})
    with pytest.raises(ConfigError, match="shape"):
        detect_weight_mark(other, KEYS, reference=original)


def test_bad_parameters_are_refused(original: Tensors) -> None:
    with pytest.raises(ConfigError):
        embed_weight_mark(original, KEYS, strength=0)
    with pytest.raises(ConfigError):
        embed_weight_mark(original, KEYS, bits=4)
    with pytest.raises(ConfigError):
        embed_weight_mark(original, KEYS, layers=["nope"])
    with pytest.raises(ConfigError, match="too few"):
        embed_weight_mark({"w": np.ones((8, 16), np.float32)}, KEYS, layers=["w"])
    with pytest.raises(ConfigError, match="no 2-D"):
        embed_weight_mark({"b": np.ones(1000, np.float32)}, KEYS)


# -- keys ----------------------------------------------------------------------------------------------------


def test_keys_are_distinct_per_type_and_model_and_hidden_from_repr() -> None:
    a = derive_watermark_keys(bytes(32), "m")
    b = derive_watermark_keys(bytes(32), "n")
    assert len({a.weights, a.embedding, a.text, b.weights}) == 4
    assert a == derive_watermark_keys(bytes(32), "m")
    assert a.weights.hex() not in repr(a)


def test_short_secret_and_empty_model_id_are_refused() -> None:
    with pytest.raises(ConfigError):
        derive_watermark_keys(bytes(31), "m")
    with pytest.raises(ConfigError):
        derive_watermark_keys(bytes(32), "")


def test_key_file_formats() -> None:
    secret = bytes(range(32))
    assert parse_key_file(secret.hex().encode() + b"\n") == secret
    assert parse_key_file(secret) == secret
    with pytest.raises(ConfigError):
        parse_key_file(b"abcd")
