"""The first deploy, walked as docs/deploy.md ("First deploy") writes it, with synthesized outputs.

Phase 1 (``firstDeploy=true``, one module-scoped synth) creates the model key with no release statement;
its ``cdk deploy --outputs-file`` JSON is simulated from the synthesized template's Outputs (intrinsics
replaced by fake resolved values: a key ARN, a cache endpoint, ...); a model is sealed under that key ARN;
``nitrovault deploy enclave-config`` (in process) writes ``enclave.json``, which the enclave's own loader
and the image build's config step (``scripts/enclave_config.py``) accept unchanged. Phase 2 is the
session's ``synth`` (the sample manifest as the built image's): the same key, only its policy changed,
and the phase-2 outputs reproduce ``enclave.json`` byte for byte. The docs' command sequence is checked
against the app's context keys and the command's options, in the order tested here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aws_cdk.assertions import Annotations, Match, Template
from safetensors.numpy import save_file
from synth_context import ACCOUNT, BASE_CONTEXT, REGION, SAMPLE_MANIFEST, Synth
from typer.testing import CliRunner

from enclave_app.config import EnclaveConfig
from infra.review_aspect import ANNOTATION_PREFIX
from nitrovault.cli import app as cli_app
from nitrovault.envelope import SealedModel, seal_file
from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "deploy.md"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
CONTEXT = {"model": "resnet", "version": "7"}
STORE_HOST = "master.nv-state.abc123.use1.cache.amazonaws.com"
BASE_CONFIG = {"handler": "generic:mlp-classifier", "limits": {"max_batch": 16}}


def _model_key(s: Synth) -> tuple[str, dict[str, Any]]:
    return s.model_key()


def fake_outputs(template: dict[str, Any], stack: str = "Nitrovault") -> dict[str, dict[str, str]]:
    """What ``cdk deploy --outputs-file`` would write: every output with its intrinsics resolved to fake
    values that have the real shapes (a resource's fake value depends only on its logical id)."""
    resources = template["Resources"]

    def attribute(logical: str, name: str) -> str:
        kind = resources[logical]["Type"]
        fake = uuid.uuid5(uuid.NAMESPACE_URL, logical)
        values = {
            ("AWS::KMS::Key", "Arn"): f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{fake}",
            ("AWS::ElastiCache::ReplicationGroup", "PrimaryEndPoint.Address"): STORE_HOST,
            ("AWS::ElastiCache::ReplicationGroup", "PrimaryEndPoint.Port"): "6379",
            ("AWS::ElasticLoadBalancingV2::LoadBalancer", "DNSName"): f"nv-{fake.hex[:8]}.elb.amazonaws.com",
        }
        return values[(kind, name)]

    def ref(logical: str) -> str:
        props = resources[logical].get("Properties", {})
        for name in ("BucketName", "AlarmName", "AutoScalingGroupName"):
            if isinstance(props.get(name), str):
                return str(props[name])
        return f"{logical.lower()}-{uuid.uuid5(uuid.NAMESPACE_URL, logical).hex[:8]}"

    def resolve(value: Any) -> str:
        if isinstance(value, str):
            return value
        if "Fn::GetAtt" in value:
            return attribute(*value["Fn::GetAtt"])
        if "Ref" in value:
            return ref(value["Ref"])
        if "Fn::Join" in value:
            sep, parts = value["Fn::Join"]
            return str(sep).join(resolve(p) for p in parts)
        raise AssertionError(f"an output intrinsic this simulation does not know: {value}")

    return {stack: {name: resolve(o["Value"]) for name, o in template["Outputs"].items()}}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    from infra.app import build_app

    outdir = tmp_path_factory.mktemp("cdk.out.first")
    app, stack = build_app({**BASE_CONTEXT, "firstDeploy": "true"}, outdir=str(outdir))
    app.synth()
    return Synth(app=app, stack=stack, template=Template.from_stack(stack), outdir=outdir)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, first: Synth) -> Path:
    """The operator's folder after phase 1: cdk-outputs.json, enclave.base.json, model.sealed."""
    folder = tmp_path_factory.mktemp("first-deploy")
    outputs = fake_outputs(first.template.to_json())
    (folder / "cdk-outputs.json").write_text(json.dumps(outputs, indent=2))
    (folder / "enclave.base.json").write_text(json.dumps(BASE_CONFIG))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    # `nitrovault seal --key-id alias/...` stores the key ARN KMS answers with: the ModelKeyArn output
    seal_file(folder / "model.safetensors", folder / "model.sealed", data_key=bytearray(range(32)),
              wrapped_key=b"wrapped", key_id=outputs["Nitrovault"]["ModelKeyArn"], encryption_context=CONTEXT)
    return folder


def enclave_config(folder: Path, config: str, output: str) -> Any:
    return CliRunner().invoke(cli_app, [
        "deploy", "enclave-config", "--outputs", str(folder / "cdk-outputs.json"),
        "--config", str(folder / config), "--sealed-model", str(folder / "model.sealed"),
        "-o", str(folder / output),
    ])


def _allowed(s: Synth, action: str, role: str, pcrs: dict[int, bytes] | None) -> bool:
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/i-0123456789abcdef0"
    key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
    request = build_request_context(action, session, key_arn, encryption_context=CONTEXT,
                                    attestation_pcrs=pcrs)
    return evaluate_key_policy(_model_key(s)[1]["Properties"]["KeyPolicy"], request).allowed


# -- phase 1 -------------------------------------------------------------------------------------------------


def test_phase1_key_can_seal_but_releases_to_no_enclave(first: Synth) -> None:
    statements = _model_key(first)[1]["Properties"]["KeyPolicy"]["Statement"]
    assert [s["Sid"] for s in statements] == [
        "KeyAdministration", "SealModel", "DenyDecryptWithoutAttestation",
    ]
    image = dict(load_manifest(SAMPLE_MANIFEST).pcrs)
    assert not _allowed(first, "Decrypt", "nitrovault-enclave-host", image)
    assert not _allowed(first, "Decrypt", "nitrovault-enclave-host", None)
    assert _allowed(first, "GenerateDataKey", "nitrovault-sealer", None)  # the model can be sealed now
    outputs = first.template.to_json()["Outputs"]
    assert outputs["ModelKeyReleaseSets"]["Value"] == "0"
    assert {"ModelKeyArn", "ModelId", "ModelVersion", "StateStoreEndpointAddress"} <= set(outputs)
    assert "no image yet" in first.template.to_json()["Description"]


def test_phase1_is_cdk_nag_cfn_lint_and_review_clean(first: Synth) -> None:
    annotations = Annotations.from_stack(first.stack)
    for pattern in ("AwsSolutions-.*", ANNOTATION_PREFIX):
        assert annotations.find_error("*", Match.string_like_regexp(pattern)) == []
        assert annotations.find_warning("*", Match.string_like_regexp(pattern)) == []
    templates = sorted(first.outdir.glob("*.template.json"))
    proc = subprocess.run([str(CFN_LINT), "--format", "parseable", *map(str, templates)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert [line for line in out.splitlines() if ":E" in line] == [] and not proc.returncode & 2, out
    # the docs' review step of phase 1
    result = CliRunner().invoke(cli_app, ["policy", "review", str(first.outdir), "--fail-on", "low",
                                          "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model = [k for k in report["keys"] if "ModelKey" in k["key"]]
    assert len(model) == 1 and all(g["verdict"] != "attested-release" for g in model[0]["grants"])


# -- enclave.json from phase 1's outputs ---------------------------------------------------------------------


def test_enclave_config_is_written_from_the_outputs(work: Path) -> None:
    result = enclave_config(work, "enclave.base.json", "enclave.json")
    assert result.exit_code == 0, result.output
    outputs = json.loads((work / "cdk-outputs.json").read_text())["Nitrovault"]
    config = EnclaveConfig.load(work / "enclave.json")
    assert config.kms_key_arn == outputs["ModelKeyArn"] and config.kms_key_arn.startswith("arn:aws:kms:")
    assert config.region == REGION
    assert (config.model_id, config.model_version) == ("resnet", "7")
    assert dict(config.encryption_context) == CONTEXT
    assert config.state_store is not None and config.state_store.host == STORE_HOST
    assert config.sealed_digest == SealedModel.open(work / "model.sealed").header.digest.hex()
    assert config.handler == "generic:mlp-classifier" and config.limits.max_batch == 16  # the owner's part
    assert "0 measurement set(s)" in result.output  # phase 1: nothing can decrypt yet


def test_enclave_config_is_canonical_and_the_image_build_keeps_it(work: Path, tmp_path: Path) -> None:
    assert enclave_config(work, "enclave.base.json", "enclave.json").exit_code == 0
    assert enclave_config(work, "enclave.base.json", "again.json").exit_code == 0
    written = (work / "enclave.json").read_bytes()
    assert (work / "again.json").read_bytes() == written  # same inputs, same bytes (same PCR2)
    # scripts/build_enclave.sh's step 0 (scripts/enclave_config.py) leaves it exactly as it is
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "enclave_config.py"), "--config", str(work / "enclave.json"),
         "--sealed-model", str(work / "model.sealed"), "--output", str(tmp_path / "built.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "built.json").read_bytes() == written


# -- phase 2 -------------------------------------------------------------------------------------------------


def test_phase2_is_the_same_key_with_the_images_release_added(first: Synth, synth: Synth) -> None:
    (first_id, first_key), (second_id, second_key) = _model_key(first), _model_key(synth)
    assert first_id == second_id  # same logical id: updated in place, the ARN in enclave.json stays
    assert {k: v for k, v in first_key.items() if k != "Properties"} == {
        k: v for k, v in second_key.items() if k != "Properties"
    }
    assert {k: v for k, v in first_key["Properties"].items() if k != "KeyPolicy"} == {
        k: v for k, v in second_key["Properties"].items() if k != "KeyPolicy"
    }
    before = first_key["Properties"]["KeyPolicy"]["Statement"]
    after = second_key["Properties"]["KeyPolicy"]["Statement"]
    assert after[2]["Sid"] == "ReleaseToAttestedEnclave" and [*after[:2], *after[3:]] == before
    assert _allowed(synth, "Decrypt", "nitrovault-enclave-host", dict(load_manifest(SAMPLE_MANIFEST).pcrs))
    first_outputs, second_outputs = (s.template.to_json()["Outputs"] for s in (first, synth))
    assert first_outputs["ModelKeyArn"] == second_outputs["ModelKeyArn"]


def test_phase2_outputs_reproduce_the_image_config_byte_for_byte(work: Path, synth: Synth) -> None:
    assert enclave_config(work, "enclave.base.json", "enclave.json").exit_code == 0
    phase2 = work / "phase2"
    phase2.mkdir(exist_ok=True)
    (phase2 / "cdk-outputs.json").write_text(json.dumps(fake_outputs(synth.template.to_json())))
    for name in ("enclave.json", "model.sealed"):
        (phase2 / name).write_bytes((work / name).read_bytes())
    result = enclave_config(phase2, "enclave.json", "enclave.check.json")
    assert result.exit_code == 0, result.output
    assert "1 measurement set(s)" in result.output
    assert (phase2 / "enclave.check.json").read_bytes() == (work / "enclave.json").read_bytes()


def test_phase2_with_another_model_version_is_caught_by_the_check(work: Path, synth: Synth) -> None:
    # Negative for the check above: deployed with -c modelVersion=8, the stack no longer fits the image.
    assert enclave_config(work, "enclave.base.json", "enclave.json").exit_code == 0
    drifted = work / "drifted"
    drifted.mkdir(exist_ok=True)
    outputs = fake_outputs(synth.template.to_json())
    outputs["Nitrovault"]["ModelVersion"] = "8"
    (drifted / "cdk-outputs.json").write_text(json.dumps(outputs))
    for name in ("enclave.json", "model.sealed"):
        (drifted / name).write_bytes((work / name).read_bytes())
    result = enclave_config(drifted, "enclave.json", "enclave.check.json")
    assert result.exit_code == 1 and "step 4 (config)" in result.output
    assert not (drifted / "enclave.check.json").exists()


# -- the documented sequence ---------------------------------------------------------------------------------


def _first_deploy_commands() -> list[str]:
    text = DOCS.read_text()
    section = text.split("\n## First deploy\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_docs_first_deploy_is_the_sequence_tested_here() -> None:
    from infra.app import _CONTEXT_KEYS

    commands = _first_deploy_commands()
    order = [
        next(i for i, c in enumerate(commands) if c.startswith(prefix) and needle in c)
        for prefix, needle in (
            ("make synth", "firstDeploy=true"),
            ("nitrovault policy review", "--fail-on"),
            ("cdk deploy", "-c firstDeploy=true"),
            ("nitrovault seal", "--key-id"),
            ("nitrovault deploy enclave-config", "enclave.base.json"),
            ("scripts/build_enclave.sh", "--config enclave.json"),
            ("make synth", "PCR_MANIFEST=build/pcr-manifest.json"),
            ("nitrovault policy review", "--pcr-manifest build/pcr-manifest.json"),
            ("cdk deploy", "-c pcrManifest=build/pcr-manifest.json"),
            ("nitrovault deploy enclave-config", "--config enclave.json"),
            ("cmp", "enclave.check.json"),
        )
    ]
    assert order == sorted(order), commands
    # every context key the commands pass exists, and every deploy writes the outputs file
    for key in re.findall(r"-c (\w+)=", "\n".join(commands)):
        assert key in _CONTEXT_KEYS, key
    assert all("--outputs-file cdk-outputs.json" in c for c in commands if c.startswith("cdk deploy"))
    # every option the docs give the command is one it has
    from typer.main import get_command

    deploy = get_command(cli_app).commands["deploy"].commands["enclave-config"]  # type: ignore[attr-defined]
    options = {o for p in deploy.params for o in p.opts}
    for command in commands:
        if command.startswith("nitrovault deploy enclave-config"):
            assert set(re.findall(r"(?<!\S)(--?[a-z-]+)", command)) <= options, command
