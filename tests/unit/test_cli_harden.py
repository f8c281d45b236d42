"""``nitrovault harden``, ``nitrovault seal --harden-key`` and ``nitrovault fingerprint identify`` on real
files: exit 0 names the copy, 1 names none, 2 is bad input with one ``error:`` line and no traceback."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_harden import mlp
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.envelope import SealedModel
from nitrovault.owner.harden import Model

runner = CliRunner()


def write(model: Model, path: Path) -> Path:
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.tensors.items()}, str(path),
              metadata=model.file_metadata())
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    key = tmp_path / "owner-harden.key"
    key.write_text(secrets.token_hex(32) + "\n")
    return {"key": key, "model": write(mlp(), tmp_path / "model.safetensors"),
            "registry": tmp_path / "fingerprints.json", "tmp": tmp_path}


def harden(files: dict[str, Path], copy_id: str, *extra: str) -> Path:
    out = files["tmp"] / f"{copy_id}.safetensors"
    result = runner.invoke(app, ["harden", str(files["model"]), "--secret", str(files["key"]), "-o", str(out),
                                 "--copy-id", copy_id, "--registry", str(files["registry"]), *extra])
    assert result.exit_code == 0, result.output
    return out


def identify(files: dict[str, Path], suspect: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["fingerprint", "identify", str(suspect), "--registry",
                                 str(files["registry"]), "--reference", str(files["model"]), "--key-file",
                                 str(files["key"]), *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_harden_then_identify_names_the_copy(files: dict[str, Path]) -> None:
    copies = [harden(files, f"region-{i}") for i in range(3)]
    code, output = identify(files, copies[1], "--json")
    report = json.loads(output)
    assert code == 0 and report["copy_id"] == "region-1" and report["copies_tested"] == 3
    assert report["p_value"] <= 1e-6
    code, output = identify(files, copies[2])
    assert code == 0 and "IDENTIFIED copy 'region-2'" in output


def test_a_leaked_copy_stripped_of_its_metadata_is_still_named(files: dict[str, Path]) -> None:
    copy = harden(files, "region-0")
    from safetensors.torch import load_file

    stripped = files["tmp"] / "stripped.safetensors"
    save_file(load_file(copy), str(stripped))  # no __metadata__ at all
    code, output = identify(files, stripped)
    assert code == 0 and "region-0" in output


def test_identify_exits_1_when_no_copy_matches(files: dict[str, Path]) -> None:
    harden(files, "region-0")
    code, output = identify(files, files["model"])  # the original itself is no hardened copy
    assert code == 1 and "no copy matched" in output


def test_later_copies_take_the_registry_s_own_parameters(files: dict[str, Path]) -> None:
    harden(files, "region-0", "--traps", "2", "--value-mark", "1")
    later = harden(files, "region-1")  # no options: the registry's own traps and value mark
    from safetensors import safe_open

    with safe_open(str(later), "pt") as f:
        assert json.loads(f.metadata()["nitrovault.config"])["hidden"] == [130, 130]
    code, output = identify(files, later, "--json")
    best = json.loads(output)["best"][0]
    assert code == 0 and best["copy_id"] == "region-1" and best["values_p"] <= 1e-6
    result = runner.invoke(app, ["harden", str(files["model"]), "--secret", str(files["key"]), "-o",
                                 str(files["tmp"] / "x.safetensors"), "--copy-id", "region-2", "--registry",
                                 str(files["registry"]), "--traps", "4"])
    assert result.exit_code == 2 and "2 traps per layer, not 4" in result.output


def test_a_registry_without_a_value_mark_field_reads_as_none(files: dict[str, Path]) -> None:
    harden(files, "region-0")
    raw = json.loads(files["registry"].read_text())
    del raw["params"]["value_strength"]
    files["registry"].write_text(json.dumps(raw))
    code, _ = identify(files, files["tmp"] / "region-0.safetensors")
    assert code == 0


def test_harden_keeps_dtypes_and_metadata_and_writes_a_private_file(files: dict[str, Path]) -> None:
    out = harden(files, "region-0", "--traps", "2")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("net.0.weight").dtype == torch.float32
    assert json.loads(metadata["nitrovault.config"])["hidden"] == [130, 130]
    assert metadata["nitrovault.handler"] == "generic:mlp-classifier"
    assert out.stat().st_mode & 0o777 == 0o600


def test_seal_with_a_harden_key_seals_a_registered_copy(files: dict[str, Path]) -> None:
    data_key = secrets.token_bytes(32)
    (files["tmp"] / "dk.bin").write_bytes(data_key)
    (files["tmp"] / "wk.bin").write_bytes(b"wrapped")
    sealed = files["tmp"] / "copy.sealed"
    result = runner.invoke(app, [
        "seal", str(files["model"]), "--key-id", "alias/model", "-o", str(sealed), "-q",
        "--data-key-file", str(files["tmp"] / "dk.bin"), "--wrapped-key-file", str(files["tmp"] / "wk.bin"),
        "--harden-key", str(files["key"]), "--copy-id", "eu-west-1", "--registry", str(files["registry"])])
    assert result.exit_code == 0, result.output
    assert "eu-west-1" in files["registry"].read_text()
    assert not list(files["tmp"].glob(".nitrovault-harden-*"))  # the plaintext copy is gone
    opened = SealedModel.open(sealed)  # what an enclave unseals, leaked as a plain file
    tensors, metadata = opened.load_tensors(data_key), opened.metadata(data_key)
    leak = Model.from_file_parts({k: v.numpy() for k, v in tensors.items()}, metadata)
    assert leak.config["hidden"] == [132, 132]
    suspect = write(leak, files["tmp"] / "leak.safetensors")
    code, output = identify(files, suspect)
    assert code == 0 and "eu-west-1" in output, output


def test_seal_refuses_half_of_the_harden_options(files: dict[str, Path]) -> None:
    result = runner.invoke(app, ["seal", str(files["model"]), "--key-id", "k", "-o", str(files["tmp"] / "o"),
                                 "--harden-key", str(files["key"]), "--copy-id", "x"])
    assert result.exit_code == 2 and "--registry" in result.output


def bad_inputs(files: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    tmp = files["tmp"]
    copy = harden(files, "region-0")
    (tmp / "corrupt.json").write_text("{not json")
    (tmp / "other.key").write_text(secrets.token_hex(32))
    (tmp / "short.key").write_text("abcd")
    (tmp / "garbage.safetensors").write_bytes(b"\x00" * 64)
    other_shape = write(mlp(features=32), tmp / "other-shape.safetensors")
    foreign = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(foreign), metadata={"nitrovault.handler": "generic:resnet"})
    reg, ref, key = str(files["registry"]), str(files["model"]), str(files["key"])
    base = ["fingerprint", "identify"]
    return {
        "corrupt registry": ([*base, str(copy), "--registry", str(tmp / "corrupt.json"), "--reference", ref,
                              "--key-file", key], "cannot read the registry"),
        "another key": ([*base, str(copy), "--registry", reg, "--reference", ref, "--key-file",
                         str(tmp / "other.key")], "not the master key"),
        "a short key": ([*base, str(copy), "--registry", reg, "--reference", ref, "--key-file",
                         str(tmp / "short.key")], "at least 32 bytes"),
        "another reference": ([*base, str(copy), "--registry", reg, "--reference", str(other_shape),
                               "--key-file", key], "not the model this registry"),
        "a suspect of other shapes": ([*base, str(other_shape), "--registry", reg, "--reference", ref,
                                       "--key-file", key], "has shape"),
        "an unreadable suspect": ([*base, str(tmp / "garbage.safetensors"), "--registry", reg, "--reference",
                                   ref, "--key-file", key], "not a readable safetensors file"),
        "another architecture": ([*base, str(foreign), "--registry", reg, "--reference", ref, "--key-file",
                                  key], "the suspect has no tensor 'net.0.weight': not this architecture"),
        "harden another architecture": (["harden", str(foreign), "--secret", key, "-o",
                                          str(tmp / "x.safetensors")], "hardening supports"),
        "harden a registered copy id again": (["harden", ref, "--secret", key, "-o",
                                               str(tmp / "y.safetensors"), "--copy-id", "region-0",
                                               "--registry", reg], "already in the registry"),
        "harden onto its input": (["harden", ref, "--secret", key, "-o", ref], "must not be the input"),
    }


def test_bad_input_to_every_new_command_exits_2_with_one_clear_line(files: dict[str, Path]) -> None:
    for name, (args, message) in bad_inputs(files).items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output, (name, result.output)
        assert "Traceback" not in result.output, name
