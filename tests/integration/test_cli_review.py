"""``nitrovault review`` in process: policy files, templates, cdk.out folders, exit codes and JSON.

The command is registered here on a throw-away Typer app, exactly as the lead registers it on the main one
(``app.command("review")(review_cmd.review)``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from nitrovault.cli import review_cmd
from nitrovault.policy.build import model_key_policy

ACCT = "111122223333"
PCRS = {i: hashlib.sha384(f"image-pcr{i}".encode()).digest() for i in (0, 1, 2)}
runner = CliRunner()


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("review")(review_cmd.review)
    app.command("noop")(lambda: None)  # two commands: Typer then expects the sub-command name
    return app


def model_policy() -> dict[str, Any]:
    return model_key_policy(
        account_id=ACCT,
        admin_arns=[f"arn:aws:iam::{ACCT}:role/admin"],
        sealer_arns=[f"arn:aws:iam::{ACCT}:role/sealer"],
        enclave_role_arns=[f"arn:aws:iam::{ACCT}:role/enclave"],
        pcrs=PCRS,
        encryption_context={"model": "m"},
    )


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write(tmp_path / "pcr-manifest.json", {"pcrs": {str(i): v.hex() for i, v in PCRS.items()}})


DEFAULT_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    ],
}


def test_model_policy_is_clean_exit_0(cli: typer.Typer, tmp_path: Path, manifest: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    result = runner.invoke(cli, ["review", str(path), "--manifest", str(manifest)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output and "attested-release" in result.output


def test_default_policy_exit_1_and_json(cli: typer.Typer, tmp_path: Path) -> None:
    path = write(tmp_path / "policy.json", DEFAULT_POLICY)
    result = runner.invoke(cli, ["review", str(path), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert set(doc) == {"manifest", "keys", "findings"}
    root = [f for f in doc["findings"] if f["category"] == "root-delegation"]
    assert root and root[0]["severity"] == "critical" and root[0]["key"] == "policy.json"
    assert {"rule_id", "category", "severity", "key", "statement", "message"} <= set(root[0])
    assert doc["keys"][0]["grants"][0]["allowed_without_attestation"] is True


def test_get_key_policy_output_is_accepted(cli: typer.Typer, tmp_path: Path, manifest: Path) -> None:
    wrapped = {"Policy": json.dumps(model_policy()), "PolicyName": "default"}
    path = write(tmp_path / "get-key-policy.json", wrapped)
    assert runner.invoke(cli, ["review", str(path), "--manifest", str(manifest)]).exit_code == 0


def test_manifest_mismatch_exit_1(cli: typer.Typer, tmp_path: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    other = write(tmp_path / "m.json", {"pcrs": {"0": "ab" * 48, "1": PCRS[1].hex(), "2": PCRS[2].hex()}})
    result = runner.invoke(cli, ["review", str(path), "--manifest", str(other), "--json"])
    assert result.exit_code == 1
    assert [f["category"] for f in json.loads(result.stdout)["findings"]] == ["manifest-mismatch"]


def test_cdk_out_folder_with_environment(cli: typer.Typer, tmp_path: Path, manifest: Path) -> None:
    out = tmp_path / "cdk.out"
    out.mkdir()
    good = {"Resources": {"Key": {"Type": "AWS::KMS::Key", "Properties": {"KeyPolicy": model_policy()}}}}
    bad = {
        "Resources": {
            "Key": {
                "Type": "AWS::KMS::Key",
                "Properties": {
                    "KeyPolicy": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": "kms:*",
                                "Resource": "*",
                                "Principal": {"AWS": {"Fn::Sub": "arn:aws:iam::${AWS::AccountId}:root"}},
                            }
                        ],
                    }
                },
            }
        }
    }
    write(out / "Good.template.json", good)
    write(out / "Bad.template.json", bad)
    write(
        out / "manifest.json",
        {
            "version": "36.0.0",
            "artifacts": {
                "Bad": {
                    "type": "aws:cloudformation:stack",
                    "environment": f"aws://{ACCT}/eu-west-1",
                    "properties": {"templateFile": "Bad.template.json"},
                }
            },
        },
    )
    result = runner.invoke(cli, ["review", str(out), "--manifest", str(manifest), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert sorted(k["key"] for k in doc["keys"]) == ["Bad.template.json/Key", "Good.template.json/Key"]
    assert {f["key"] for f in doc["findings"]} == {"Bad.template.json/Key"}
    root = next(f for f in doc["findings"] if f["category"] == "root-delegation")
    assert root["principal"] == f"arn:aws:iam::{ACCT}:root"  # account resolved from manifest.json


def test_only_good_templates_exit_0(cli: typer.Typer, tmp_path: Path, manifest: Path) -> None:
    template = {"Resources": {"Key": {"Type": "AWS::KMS::Key", "Properties": {"KeyPolicy": model_policy()}}}}
    path = write(tmp_path / "Stack.template.json", template)
    result = runner.invoke(cli, ["review", str(path), "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"Statement": [{"Effect": "Allow"}]}), json.dumps([1, 2])],
    ids=["not-json", "malformed-policy", "not-an-object"],
)
def test_unreadable_input_exit_2(cli: typer.Typer, tmp_path: Path, content: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(content)
    result = runner.invoke(cli, ["review", str(path)])
    assert result.exit_code == 2


def test_missing_file_empty_folder_and_bad_manifest_exit_2(cli: typer.Typer, tmp_path: Path) -> None:
    assert runner.invoke(cli, ["review", str(tmp_path / "nope.json")]).exit_code == 2
    assert runner.invoke(cli, ["review", str(tmp_path)]).exit_code == 2
    policy = write(tmp_path / "policy.json", model_policy())
    bad = write(tmp_path / "m.json", {"pcrs": {"0": "0x" + "ab" * 47}})
    result = runner.invoke(cli, ["review", str(policy), "--manifest", str(bad)])
    assert result.exit_code == 2 and "PCR0" in result.output


def test_usage_error_exit_2(cli: typer.Typer) -> None:
    assert runner.invoke(cli, ["review"]).exit_code == 2
