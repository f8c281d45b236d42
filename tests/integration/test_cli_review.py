"""``nitrovault policy review`` in process, through the real ``nitrovault`` app: key policies (bare and as
``aws kms get-key-policy`` prints them), JSON and YAML templates, cdk.out folders, several inputs, the
three formats (SARIF validated against the required parts of the SARIF 2.1.0 schema), ``--fail-on`` and
the exit codes 0 / 3 / 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.cli.review_cmd import load_cfn_yaml
from nitrovault.policy.build import model_key_policy

ACCT = "111122223333"
PCRS = {i: hashlib.sha384(f"image-pcr{i}".encode()).digest() for i in (0, 1, 2)}
ENCLAVE = f"arn:aws:iam::{ACCT}:role/enclave"
runner = CliRunner()


def review(*args: str) -> Any:
    return runner.invoke(app, ["policy", "review", *args], env={"COLUMNS": "250"})


def model_policy() -> dict[str, Any]:
    return model_key_policy(
        account_id=ACCT,
        admin_arns=[f"arn:aws:iam::{ACCT}:role/admin"],
        sealer_arns=[f"arn:aws:iam::{ACCT}:role/sealer"],
        enclave_role_arns=[ENCLAVE],
        pcrs=PCRS,
        encryption_context={"model": "m"},
    )


def write(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write(tmp_path / "pcr-manifest.json", {"pcrs": {str(i): v.hex() for i, v in PCRS.items()}})


DEFAULT_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCT}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    ],
}


def without_deny() -> dict[str, Any]:
    """The model policy minus its explicit Deny: one medium recommendation (NV-NO-DENY), nothing above."""
    policy = model_policy()
    policy["Statement"] = [s for s in policy["Statement"] if s["Effect"] != "Deny"]
    return policy


# -- exit codes and formats -------------------------------------------------------------------------------


def test_model_policy_is_clean_exit_0(tmp_path: Path, manifest: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    result = review(str(path), "--pcr-manifest", str(manifest))
    assert result.exit_code == 0, result.output
    assert "no findings" in result.output and "attested-release" in result.output


def test_default_policy_exit_3_and_json_shape(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.json", DEFAULT_POLICY)
    result = review(str(path), "--format", "json")
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert set(doc) == {"keys", "findings"}
    root = [f for f in doc["findings"] if f["category"] == "root-delegation"]
    assert root and root[0]["severity"] == "critical" and root[0]["key"] == "policy.json"
    assert {"rule_id", "category", "severity", "key", "statement", "message"} <= set(root[0])
    assert root[0]["statement"] == "Enable IAM User Permissions"
    assert doc["keys"][0]["grants"][0]["allowed_without_attestation"] is True
    assert "escalation" in {f["category"] for f in doc["findings"]}  # kms:* covers CreateGrant/PutKeyPolicy


def test_get_key_policy_output_is_accepted(tmp_path: Path, manifest: Path) -> None:
    wrapped = {"Policy": json.dumps(model_policy()), "PolicyName": "default"}
    path = write(tmp_path / "get-key-policy.json", wrapped)
    assert review(str(path), "--pcr-manifest", str(manifest)).exit_code == 0
    bad = write(tmp_path / "bad-wrapper.json", {"Policy": DEFAULT_POLICY, "PolicyName": "default"})
    assert review(str(bad)).exit_code == 2  # the wrapper's Policy is a JSON *string*


def test_get_key_policy_wrapper_of_a_bad_policy_exit_3(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", {"Policy": json.dumps(DEFAULT_POLICY), "PolicyName": "default"})
    assert review(str(path)).exit_code == 3


def test_manifest_mismatch_exit_3(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    other = write(tmp_path / "m.json", {"pcrs": {"0": "ab" * 48, "1": PCRS[1].hex(), "2": PCRS[2].hex()}})
    result = review(str(path), "--pcr-manifest", str(other), "--format", "json")
    assert result.exit_code == 3
    assert [f["category"] for f in json.loads(result.stdout)["findings"]] == ["manifest-mismatch"]


def test_fail_on_thresholds(tmp_path: Path, manifest: Path) -> None:
    medium = write(tmp_path / "medium.json", without_deny())
    m = ["--pcr-manifest", str(manifest)]
    result = review(str(medium), *m, "--format", "json")
    assert [(f["rule_id"], f["category"]) for f in json.loads(result.stdout)["findings"]] == [
        ("NV-NO-DENY", "recommendation")
    ]
    assert review(str(medium), *m).exit_code == 0  # default --fail-on high
    assert review(str(medium), *m, "--fail-on", "high").exit_code == 0
    assert review(str(medium), *m, "--fail-on", "medium").exit_code == 3
    assert review(str(medium), *m, "--fail-on", "low").exit_code == 3
    default = write(tmp_path / "default.json", DEFAULT_POLICY)
    assert review(str(default), "--fail-on", "critical").exit_code == 3
    # high-only: a manifest mismatch is high, so --fail-on critical lets it pass
    other = write(tmp_path / "m.json", {"pcrs": {"0": "ab" * 48, "1": PCRS[1].hex(), "2": PCRS[2].hex()}})
    good = write(tmp_path / "good.json", model_policy())
    assert review(str(good), "--pcr-manifest", str(other), "--fail-on", "critical").exit_code == 0
    assert review(str(good), "--pcr-manifest", str(other), "--fail-on", "high").exit_code == 3


def test_low_severity_only_fails_at_low(tmp_path: Path) -> None:
    # the manifest has PCR8, the policy does not bind it: NV-MANIFEST-UNBOUND, low
    signed = write(
        tmp_path / "m8.json",
        {"pcrs": {**{str(i): v.hex() for i, v in PCRS.items()}, "8": hashlib.sha384(b"c").hexdigest()}},
    )
    path = write(tmp_path / "policy.json", model_policy())
    assert review(str(path), "--pcr-manifest", str(signed), "--fail-on", "medium").exit_code == 0
    result = review(str(path), "--pcr-manifest", str(signed), "--fail-on", "low", "--format", "json")
    assert result.exit_code == 3
    assert [(f["rule_id"], f["severity"]) for f in json.loads(result.stdout)["findings"]] == [
        ("NV-MANIFEST-UNBOUND", "low")
    ]


def test_several_inputs_are_reviewed_together(tmp_path: Path, manifest: Path) -> None:
    good = write(tmp_path / "good.json", model_policy())
    template = {"Resources": {"Key": {"Type": "AWS::KMS::Key", "Properties": {"KeyPolicy": model_policy()}}}}
    stack = write(tmp_path / "Stack.template.json", template)
    result = review(str(good), str(stack), "--pcr-manifest", str(manifest), "--format", "json")
    assert result.exit_code == 0, result.output
    assert [k["key"] for k in json.loads(result.stdout)["keys"]] == ["good.json", "Stack.template.json/Key"]
    bad = write(tmp_path / "bad.json", DEFAULT_POLICY)
    result = review(str(good), str(bad), "--pcr-manifest", str(manifest), "--format", "json")
    assert result.exit_code == 3
    assert {f["key"] for f in json.loads(result.stdout)["findings"]} == {"bad.json"}


# -- CloudFormation: JSON, YAML with short tags, cdk.out ---------------------------------------------------

YAML_TEMPLATE = """
AWSTemplateFormatVersion: "2010-09-09"
Parameters:
  Stage: {Type: String, Default: prod}
Resources:
  EnclaveRole:
    Type: AWS::IAM::Role
    Properties:
      RoleName: !Sub "enclave-${Stage}"
  ModelKey:
    Type: AWS::KMS::Key
    Properties:
      KeyPolicy:
        Version: "2012-10-17"
        Statement:
          - Sid: Root
            Effect: Allow
            Principal:
              AWS: !Join ["", ["arn:", !Ref "AWS::Partition", ":iam::", !Ref "AWS::AccountId", ":root"]]
            Action: kms:*
            Resource: "*"
          - Sid: Release
            Effect: Allow
            Principal: {AWS: !GetAtt EnclaveRole.Arn}
            Action: kms:Decrypt
            Resource: "*"
"""


def test_yaml_short_tags_load_as_long_forms() -> None:
    doc = load_cfn_yaml(
        "a: !Ref X\nb: !GetAtt R.Arn\nc: !Sub 'x-${Y}'\nd: !Join [':', [a, !Ref Z]]\n"
        "e: !Select [0, !GetAZs '']\nf: !If [Cond, 1, 2]\ng: !ImportValue Out\nh: !GetAtt [R, Arn]\n"
    )
    assert doc == {
        "a": {"Ref": "X"},
        "b": {"Fn::GetAtt": ["R", "Arn"]},
        "c": {"Fn::Sub": "x-${Y}"},
        "d": {"Fn::Join": [":", ["a", {"Ref": "Z"}]]},
        "e": {"Fn::Select": [0, {"Fn::GetAZs": ""}]},
        "f": {"Fn::If": ["Cond", 1, 2]},
        "g": {"Fn::ImportValue": "Out"},
        "h": {"Fn::GetAtt": ["R", "Arn"]},
    }


def test_yaml_template_with_short_tags_is_reviewed(tmp_path: Path) -> None:
    path = write(tmp_path / "stack.yaml", YAML_TEMPLATE)
    result = review(str(path), "--account", ACCT, "--format", "json")
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert [k["key"] for k in doc["keys"]] == ["stack.yaml/ModelKey"]
    root = next(f for f in doc["findings"] if f["rule_id"] == "NV-ROOT-DELEGATION")
    assert root["principal"] == f"arn:aws:iam::{ACCT}:root"  # !Join + !Ref rendered
    unattested = next(f for f in doc["findings"] if f["rule_id"] == "NV-PLAINTEXT-UNATTESTED"
                      and f["statement"] == "Release")
    assert unattested["principal"] == f"arn:aws:iam::{ACCT}:role/enclave-prod"  # !GetAtt + !Sub rendered


def test_good_yaml_template_exit_0(tmp_path: Path, manifest: Path) -> None:
    policy = json.dumps(model_policy())  # JSON is YAML: a flow mapping inside a block document
    text = f"Resources:\n  Key:\n    Type: AWS::KMS::Key\n    Properties:\n      KeyPolicy: {policy}\n"
    path = write(tmp_path / "good.yml", text)
    result = review(str(path), "--pcr-manifest", str(manifest))
    assert result.exit_code == 0, result.output


def test_cdk_out_folder_with_environment(tmp_path: Path, manifest: Path) -> None:
    out = tmp_path / "cdk.out"
    (out / "assembly-Prod").mkdir(parents=True)
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
    write(out / "assembly-Prod" / "ProdStack.template.json", good)
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
    result = review(str(out), "--pcr-manifest", str(manifest), "--format", "json")
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert sorted(k["key"] for k in doc["keys"]) == [
        "Bad.template.json/Key",
        "Good.template.json/Key",
        "assembly-Prod/ProdStack.template.json/Key",
    ]
    assert {f["key"] for f in doc["findings"]} == {"Bad.template.json/Key"}
    root = next(f for f in doc["findings"] if f["category"] == "root-delegation")
    assert root["principal"] == f"arn:aws:iam::{ACCT}:root"  # account resolved from manifest.json


def test_only_good_templates_exit_0(tmp_path: Path, manifest: Path) -> None:
    template = {"Resources": {"Key": {"Type": "AWS::KMS::Key", "Properties": {"KeyPolicy": model_policy()}}}}
    path = write(tmp_path / "Stack.template.json", template)
    result = review(str(path), "--pcr-manifest", str(manifest))
    assert result.exit_code == 0, result.output


# -- SARIF --------------------------------------------------------------------------------------------------

#: The parts of the SARIF 2.1.0 schema (OASIS, sarif-schema-2.1.0.json) our log uses: required keys,
#: types and enums, written by hand so the test needs no network and no vendored 100 kB schema.
SARIF_SUBSET: dict[str, Any] = {
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "$schema": {"type": "string", "format": "uri"},
        "version": {"const": "2.1.0"},
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["tool"],
                "properties": {
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "version": {"type": "string"},
                                    "informationUri": {"type": "string"},
                                    "rules": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["id"],
                                            "properties": {
                                                "id": {"type": "string"},
                                                "shortDescription": {
                                                    "type": "object",
                                                    "required": ["text"],
                                                    "properties": {"text": {"type": "string"}},
                                                },
                                                "properties": {"type": "object"},
                                            },
                                        },
                                    },
                                },
                            }
                        },
                    },
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["message"],
                            "properties": {
                                "ruleId": {"type": "string"},
                                "ruleIndex": {"type": "integer", "minimum": -1},
                                "level": {"enum": ["none", "note", "warning", "error"]},
                                "message": {
                                    "type": "object",
                                    "anyOf": [{"required": ["text"]}, {"required": ["id"]}],
                                    "properties": {"text": {"type": "string"}},
                                },
                                "locations": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "physicalLocation": {
                                                "type": "object",
                                                "properties": {
                                                    "artifactLocation": {
                                                        "type": "object",
                                                        "properties": {"uri": {"type": "string"}},
                                                    }
                                                },
                                            },
                                            "logicalLocations": {
                                                "type": "array",
                                                "items": {
                                                    "type": "object",
                                                    "properties": {
                                                        "fullyQualifiedName": {"type": "string"},
                                                        "kind": {"type": "string"},
                                                    },
                                                },
                                            },
                                        },
                                    },
                                },
                                "properties": {"type": "object"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_sarif_output_is_valid_sarif_2_1_0(tmp_path: Path, manifest: Path) -> None:
    bad = write(tmp_path / "bad.json", DEFAULT_POLICY)
    result = review(str(bad), "--pcr-manifest", str(manifest), "--format", "sarif")
    assert result.exit_code == 3
    log = json.loads(result.stdout)
    jsonschema.validate(log, SARIF_SUBSET)
    assert log["version"] == "2.1.0" and "sarif" in log["$schema"]
    (run,) = log["runs"]
    rules = run["tool"]["driver"]["rules"]
    assert all(r["properties"]["category"] and r["shortDescription"]["text"] for r in rules)
    ids = [r["id"] for r in rules]
    assert run["results"]
    for res in run["results"]:
        assert ids[res["ruleIndex"]] == res["ruleId"]
        assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == bad.as_posix()
        assert res["locations"][0]["logicalLocations"][0]["fullyQualifiedName"].startswith("bad.json/")
    levels = {(r["properties"]["severity"], r["level"]) for r in run["results"]}
    assert ("critical", "error") in levels and ("medium", "warning") in levels
    assert {sev: lvl for sev, lvl in levels} == {
        sev: {"critical": "error", "high": "error", "medium": "warning", "low": "note"}[sev]
        for sev, _ in levels
    }


def test_sarif_of_a_clean_review_has_no_results(tmp_path: Path, manifest: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    result = review(str(path), "--pcr-manifest", str(manifest), "--format", "sarif")
    assert result.exit_code == 0
    log = json.loads(result.stdout)
    jsonschema.validate(log, SARIF_SUBSET)
    assert log["runs"][0]["results"] == []


def test_the_sarif_schema_subset_rejects_broken_logs(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.json", DEFAULT_POLICY)
    log = json.loads(review(str(path), "--format", "sarif").stdout)
    for breakage in (
        lambda d: d.update(version="2.0.0"),
        lambda d: d["runs"][0]["results"][0].update(level="critical"),
        lambda d: d["runs"][0]["results"][0]["message"].pop("text"),
        lambda d: d["runs"][0]["tool"]["driver"].pop("name"),
    ):
        broken = json.loads(json.dumps(log))
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SARIF_SUBSET)


# -- unreadable input and usage: exit 2 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        "not json", "[unclosed", json.dumps({"Statement": [{"Effect": "Allow"}]}), json.dumps([1, 2]),
        "- a\n- b\n",
    ],
    ids=["not-json", "not-yaml", "malformed-policy", "not-an-object", "yaml-list"],
)
def test_unreadable_input_exit_2(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "p.json", content)
    result = review(str(path))
    assert result.exit_code == 2, result.output


def test_missing_file_empty_folder_and_bad_manifest_exit_2(tmp_path: Path) -> None:
    assert review(str(tmp_path / "nope.json")).exit_code == 2
    assert review(str(tmp_path)).exit_code == 2
    policy = write(tmp_path / "policy.json", model_policy())
    bad = write(tmp_path / "m.json", {"pcrs": {"0": "0x" + "ab" * 47}})
    result = review(str(policy), "--pcr-manifest", str(bad))
    assert result.exit_code == 2 and "PCR0" in result.output


def test_one_unreadable_input_among_good_ones_exit_2(tmp_path: Path) -> None:
    good = write(tmp_path / "policy.json", model_policy())
    assert review(str(good), str(tmp_path / "absent.json")).exit_code == 2


def test_usage_errors_exit_2() -> None:
    assert review().exit_code == 2
    assert review("x.json", "--format", "xml").exit_code == 2
    assert review("x.json", "--fail-on", "severe").exit_code == 2


def test_review_is_under_the_policy_group_only(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.json", model_policy())
    assert runner.invoke(app, ["review", str(path)]).exit_code == 2  # no top-level "review" any more
    assert "review" in runner.invoke(app, ["policy", "--help"]).output


# -- several accepted measurement sets (an image rollout) -------------------------------------------------

NEXT = {i: hashlib.sha384(f"next-image-pcr{i}".encode()).digest() for i in (0, 1, 2)}


def rollout_policy() -> dict[str, Any]:
    """The model policy with a second release statement for the next image (the builder's encoding)."""
    policy = model_policy()
    current = next(s for s in policy["Statement"] if s["Sid"] == "ReleaseToAttestedEnclave")
    following = json.loads(json.dumps(current))
    following["Sid"] = "ReleaseToAttestedEnclave2"
    following["Condition"]["StringEqualsIgnoreCase"] = {
        f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in NEXT.items()
    }
    policy["Statement"].insert(policy["Statement"].index(current) + 1, following)
    return policy


def test_a_rollout_policy_reviews_clean_against_every_manifest(tmp_path: Path, manifest: Path) -> None:
    path = write(tmp_path / "policy.json", rollout_policy())
    following = write(tmp_path / "next.json", {"pcrs": {str(i): v.hex() for i, v in NEXT.items()}})
    both = ["--pcr-manifest", str(manifest), "--pcr-manifest", str(following)]
    result = review(str(path), *both, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["findings"] == []
    sets = doc["keys"][0]["measurement_sets"]
    assert [(m["statement"], m["kind"], m["manifest"]) for m in sets] == [
        ("ReleaseToAttestedEnclave", "image", 0), ("ReleaseToAttestedEnclave2", "image", 1),
    ]
    assert sets[1]["pcrs"] == {"PCR0": "match", "PCR1": "match", "PCR2": "match"}
    text = review(str(path), *both)
    assert text.exit_code == 0 and "accepted measurement sets" in text.output
    assert "ReleaseToAttestedEnclave2" in text.output and "next.json" in text.output
    # reviewed against the current image only, the next image's set is an (unreviewed) mismatch
    one = review(str(path), "--pcr-manifest", str(manifest), "--format", "json")
    assert one.exit_code == 3
    assert [(f["rule_id"], f["statement"]) for f in json.loads(one.stdout)["findings"]] == [
        ("NV-MANIFEST-MISMATCH", "ReleaseToAttestedEnclave2")
    ]


def test_a_debug_set_is_shown_and_fails_the_review(tmp_path: Path) -> None:
    policy = rollout_policy()
    debug = next(s for s in policy["Statement"] if s["Sid"] == "ReleaseToAttestedEnclave2")
    zeros = {f"kms:RecipientAttestation:PCR{i}": "00" * 48 for i in (0, 1, 2)}
    debug["Condition"]["StringEqualsIgnoreCase"] = zeros
    path = write(tmp_path / "policy.json", policy)
    result = review(str(path), "--format", "json")
    assert result.exit_code == 3
    doc = json.loads(result.stdout)
    assert doc["keys"][0]["measurement_sets"][1]["problems"] == ["debug"]
    assert ("NV-SET-DEBUG", "debug-pcr", "critical") in {
        (f["rule_id"], f["category"], f["severity"]) for f in doc["findings"]
    }


def test_sarif_carries_each_category_kind(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", without_deny())
    log = json.loads(review(str(path), "--format", "sarif").stdout)
    (run,) = log["runs"]
    kinds = {r["id"]: r["properties"]["kind"] for r in run["tool"]["driver"]["rules"]}
    assert kinds["NV-NO-DENY"] == "recommendation" and kinds["NV-PLAINTEXT-UNATTESTED"] == "exposure"
    (result,) = run["results"]
    assert result["properties"]["kind"] == "recommendation" and result["level"] == "warning"
