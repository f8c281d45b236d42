"""``nitrovault deploy enclave-config``, step by step (no synthesis: fast).

One passing case, then one negative per verification step of ``nitrovault/cli/deploy_cmd.py``, each
breaking only that step and checked to fail at it; then the exit codes of the command itself (1 for a
failed step, 2 for unreadable input) and the names it shares with the CDK app.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from nitrovault.cli import app as cli_app
from nitrovault.cli.deploy_cmd import (
    DEFAULT_STACK,
    OUTPUT_KEY_ARN,
    OUTPUT_MODEL_ID,
    OUTPUT_MODEL_VERSION,
    OUTPUT_STATE_STORE,
    enclave_config_from_outputs,
)
from nitrovault.envelope import SealedHeader, SealedModel, seal_file
from nitrovault.errors import ConfigError
from nitrovault.kms.trust import amazon_trust_services_pem

KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
STORE = "master.nv-state.abc123.euw1.cache.amazonaws.com"
CONTEXT = {"model": "resnet", "version": "7"}
OUTPUTS = {
    "Nitrovault": {
        "ModelKeyArn": KEY_ARN,
        "ModelId": "resnet",
        "ModelVersion": "7",
        "ModelKeyReleaseSets": "0",
        "StateStoreEndpointAddress": STORE,
        "WeightsBucket": "nitrovault-weights-111122223333-eu-west-1",
    }
}
BASE = {"handler": "generic:mlp-classifier"}


def seal(folder: Path, *, key_id: str = KEY_ARN, context: dict[str, str] = CONTEXT) -> Path:
    source = folder / "model.safetensors"
    if not source.exists():
        save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(source))
    out = folder / f"model-{hashlib.sha256(repr((key_id, context)).encode()).hexdigest()[:12]}.sealed"
    seal_file(source, out, data_key=bytearray(32), wrapped_key=b"w", key_id=key_id,
              encryption_context=context)
    return out


@pytest.fixture(scope="module")
def header(tmp_path_factory: pytest.TempPathFactory) -> SealedHeader:
    return SealedModel.open(seal(tmp_path_factory.mktemp("sealed"))).header


def outputs(**changes: str | None) -> dict[str, Any]:
    values = {k: v for k, v in {**OUTPUTS["Nitrovault"], **changes}.items() if v is not None}
    return {"Nitrovault": values}


def fails_at(step: int, match: str, outs: Any, base: Any, header: SealedHeader, **kw: Any) -> None:
    """``enclave_config_from_outputs(outs, base, header, **kw)`` fails at ``step``, saying ``match``."""
    with pytest.raises(ConfigError, match=rf"step {step} \([a-z ]+\): .*{match}"):
        enclave_config_from_outputs(outs, base, header, **kw)


def test_the_outputs_make_a_config_the_enclave_loads(header: SealedHeader) -> None:
    config = enclave_config_from_outputs(OUTPUTS, BASE, header)
    assert (config.kms_key_arn, config.region) == (KEY_ARN, "eu-west-1")
    assert (config.model_id, config.model_version) == ("resnet", "7")
    assert dict(config.encryption_context) == CONTEXT
    assert config.state_store is not None and config.state_store.host == STORE
    assert config.state_store.ca_bundle == amazon_trust_services_pem() == config.kms_ca_bundle
    assert config.sealed_digest == header.digest.hex()
    # a config that already agrees (a previous run's output) gives the same config
    again = enclave_config_from_outputs(OUTPUTS, json.loads(config.to_json()), header)
    assert again.to_json() == config.to_json()


# -- one negative per step -----------------------------------------------------------------------------------


def test_step1_outputs_must_hold_the_stack(header: SealedHeader) -> None:
    fails_at(1, "stacks in the file: Other", {"Other": {}}, BASE, header)
    fails_at(1, "outputs-file", {"Nitrovault": "x"}, BASE, header)
    fails_at(1, "strings", {"Nitrovault": {**OUTPUTS["Nitrovault"], "ModelVersion": 7}}, BASE, header)
    # another stack name is found with --stack
    renamed = {"Prod": OUTPUTS["Nitrovault"]}
    assert enclave_config_from_outputs(renamed, BASE, header, stack="Prod").kms_key_arn == KEY_ARN


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("arn:aws:kms:eu-west-1:111122223333:alias/nitrovault/resnet", "not an alias"),
        (None, "not missing"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", "full KMS key ARN"),
    ],
)
def test_step2_the_key_is_a_full_key_arn(header: SealedHeader, value: str | None, match: str) -> None:
    fails_at(2, match, outputs(ModelKeyArn=value), BASE, header)


def test_step3_the_model_outputs_are_there(header: SealedHeader) -> None:
    fails_at(3, "ModelVersion", outputs(ModelVersion=None), BASE, header)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_id", "other"),
        ("model_version", "6"),
        ("kms_key_arn", KEY_ARN.replace("1234abcd", "99999999")),
        ("region", "us-east-1"),
        ("encryption_context", {"model": "resnet"}),
    ],
)
def test_step4_the_config_must_not_contradict_the_stack(header: SealedHeader, field: str, value: Any) -> None:
    fails_at(4, field, OUTPUTS, {**BASE, field: value}, header)


def test_step5_state_store(header: SealedHeader) -> None:
    no_store = outputs(StateStoreEndpointAddress=None)
    fails_at(5, "stateStore=false", no_store, {**BASE, "state_store": {"host": STORE}}, header)
    fails_at(5, "bare host name", outputs(StateStoreEndpointAddress=f"{STORE}:6379"), BASE, header)
    fails_at(5, "other.example", OUTPUTS, {**BASE, "state_store": {"host": "other.example"}}, header)
    fails_at(5, "--state-store-ca", no_store, BASE, header, state_store_ca="pem")
    # without a store in the stack and in the config, the config has none
    assert enclave_config_from_outputs(no_store, BASE, header).state_store is None


def test_step6_the_sealed_model_is_this_stacks(tmp_path: Path, header: SealedHeader) -> None:
    other_key = SealedModel.open(seal(tmp_path, key_id="alias/nitrovault/resnet")).header
    fails_at(6, "seal it with --key-id", OUTPUTS, BASE, other_key)
    other_context = SealedModel.open(seal(tmp_path, context={"model": "resnet", "version": "6"})).header
    fails_at(6, "encryption context", OUTPUTS, BASE, other_context)
    fails_at(6, "pins sealed_digest", OUTPUTS, {**BASE, "sealed_digest": "ab" * 32}, header)


def test_step7_the_enclave_loader_has_the_last_word(header: SealedHeader) -> None:
    fails_at(7, "handlr", OUTPUTS, {**BASE, "handlr": "x"}, header)
    fails_at(7, "https", OUTPUTS, {**BASE, "kms_endpoint_url": "http://kms.eu-west-1.amazonaws.com"}, header)
    fails_at(7, "handler", OUTPUTS, {}, header)


# -- the command ---------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"outputs": tmp_path / "cdk-outputs.json", "config": tmp_path / "enclave.base.json",
             "sealed": seal(tmp_path), "out": tmp_path / "enclave.json"}
    paths["outputs"].write_text(json.dumps(OUTPUTS))
    paths["config"].write_text(json.dumps(BASE))
    return paths


def run(files: dict[str, Path], *extra: str) -> Any:
    return CliRunner().invoke(cli_app, [
        "deploy", "enclave-config", "--outputs", str(files["outputs"]), "--config", str(files["config"]),
        "--sealed-model", str(files["sealed"]), "-o", str(files["out"]), *extra,
    ])


def test_command_writes_the_canonical_config(files: dict[str, Path]) -> None:
    result = run(files)
    assert result.exit_code == 0, result.output
    config = enclave_config_from_outputs(OUTPUTS, BASE, SealedModel.open(files["sealed"]).header)
    assert files["out"].read_text() == config.to_json()
    assert "scripts/build_enclave.sh --config" in result.output


def test_command_takes_the_store_ca(files: dict[str, Path], tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    first_root = amazon_trust_services_pem().split("-----END CERTIFICATE-----")[0]
    ca.write_text(first_root + "-----END CERTIFICATE-----\n")
    assert run(files, "--state-store-ca", str(ca)).exit_code == 0
    assert json.loads(files["out"].read_text())["state_store"]["ca_bundle"] == ca.read_text()


def test_command_exit_1_when_a_step_fails(files: dict[str, Path]) -> None:
    files["outputs"].write_text(json.dumps(outputs(ModelKeyArn=KEY_ARN.replace(":key/", ":alias/"))))
    result = run(files)
    assert result.exit_code == 1 and "step 2 (key)" in result.output
    assert not files["out"].exists()


@pytest.mark.parametrize("broken", ["missing outputs", "outputs not json", "config not json", "not sealed"])
def test_command_exit_2_when_an_input_is_unreadable(files: dict[str, Path], broken: str) -> None:
    if broken == "missing outputs":
        files["outputs"].unlink()
    elif broken == "outputs not json":
        files["outputs"].write_text("{")
    elif broken == "config not json":
        files["config"].write_text("handler: x")
    else:
        files["sealed"].write_bytes(b"not a sealed model")
    result = run(files)
    assert result.exit_code == 2, result.output
    assert not files["out"].exists()


def test_names_shared_with_the_cdk_app() -> None:
    # outputs the stack defines (by the CfnOutput ids in infra/stacks/nitrovault_stack.py) and its name
    from infra.app import STACK_NAME

    source = (Path(__file__).resolve().parents[2] / "infra" / "stacks" / "nitrovault_stack.py").read_text()
    assert DEFAULT_STACK == STACK_NAME
    for name in (OUTPUT_KEY_ARN, OUTPUT_MODEL_ID, OUTPUT_MODEL_VERSION, OUTPUT_STATE_STORE):
        assert f'CfnOutput(self, "{name}"' in source, name
