"""Extras added to a plaintext safetensors file before sealing (``nitrovault.envelope.extras``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nitrovault.envelope.extras import with_extras
from nitrovault.errors import ConfigError


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    tensors = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.ones(4, dtype=torch.int64)}
    save_file(tensors, str(path), metadata={"nitrovault.config": "{}"})
    return path


def test_metadata_is_merged_and_tensors_are_appended(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    reference = np.random.default_rng(0).random((5, 3))
    with_extras(model, out, metadata={"nitrovault.watermark.secret": "ab" * 32},
                tensors={"nitrovault.reference": reference, "mask": np.array([True, False])})
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"nitrovault.config": "{}", "nitrovault.watermark.secret": "ab" * 32}
        assert set(f.keys()) == {"a.weight", "b", "nitrovault.reference", "mask"}
        assert torch.equal(f.get_tensor("a.weight"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert torch.equal(f.get_tensor("b"), torch.ones(4, dtype=torch.int64))
        assert np.array_equal(f.get_tensor("nitrovault.reference").numpy(), reference)
        assert f.get_tensor("mask").tolist() == [True, False]


def test_big_endian_arrays_are_written_little_endian(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with_extras(model, out, tensors={"r": np.arange(3, dtype=">f4")})
    with safe_open(str(out), framework="np") as f:
        assert f.get_tensor("r").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"tensors": {"b": np.zeros(1)}}, "may not replace"),
        ({"tensors": {"c": np.array(["x"])}}, "unsupported dtype"),
        ({"metadata": {"k": 1}}, "strings to strings"),
    ],
)
def test_bad_extras_are_refused(model: Path, tmp_path: Path, kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        with_extras(model, tmp_path / "out.safetensors", **kwargs)  # type: ignore[arg-type]


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        with_extras(bad, tmp_path / "out.safetensors")
    torn = tmp_path / "torn.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    torn.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(ConfigError, match="does not end"):
        with_extras(torn, tmp_path / "out.safetensors")
