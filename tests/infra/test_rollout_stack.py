"""An image rollout, phase by phase, as the CDK app synthesizes it (docs/deploy.md, "Rolling out a new
image"): the old image only, old and new (the overlap while the Auto Scaling group rolls), the new one
only. One synth per phase (module-scoped; the old-only phase is the session's ``synth``, the sample
manifest). Each phase is cdk-nag, cfn-lint and policy-review clean, its model key holds exactly the
phase's sets in order, and it is the same key throughout (same logical id, only its policy changes), so
the key ARN baked into both images stays valid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match, Template
from synth_context import ACCOUNT, BASE_CONTEXT, REGION, SAMPLE_MANIFEST, Synth
from typer.testing import CliRunner

from infra.review_aspect import ANNOTATION_PREFIX
from nitrovault.cli import app as cli_app
from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.manifest import PcrManifest, load_manifest

CFN_LINT = Path(sys.executable).with_name("cfn-lint")
OLD = load_manifest(SAMPLE_MANIFEST)
#: the next image: new PCR0/1/2, signed with the same certificate (same PCR8)
NEW = PcrManifest(
    pcrs={0: b"\x20" * 48, 1: b"\x21" * 48, 2: b"\x22" * 48, 8: OLD.pcrs[8]},
    image_digest="sha256:" + "2b" * 32,
    source_commit="fedcba9876543210fedcba9876543210fedcba98",
    built_at="2025-02-01T00:00:00Z",
)
#: an image no phase accepts
NEVER = PcrManifest(pcrs={0: b"\x30" * 48, 1: b"\x31" * 48, 2: b"\x32" * 48, 8: OLD.pcrs[8]},
                    image_digest="sha256:" + "3c" * 32)
CONTEXT = {"model": "resnet", "version": "7"}
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Phase:
    name: str
    synth: Synth
    expected: tuple[PcrManifest, ...]
    #: the manifests' files, as the docs' review step names them
    paths: tuple[Path, ...]


def _synth(context: dict[str, Any], outdir: Path) -> Synth:
    from infra.app import build_app

    app, stack = build_app(context, outdir=str(outdir))
    app.synth()
    return Synth(app=app, stack=stack, template=Template.from_stack(stack), outdir=outdir)


@pytest.fixture(scope="module")
def new_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifests") / "new-pcr-manifest.json"
    path.write_text(NEW.dumps())
    return path


@pytest.fixture(scope="module")
def overlap(tmp_path_factory: pytest.TempPathFactory, new_manifest: Path) -> Synth:
    context = {**BASE_CONTEXT, "pcrManifest": f"{SAMPLE_MANIFEST},{new_manifest}"}
    return _synth(context, tmp_path_factory.mktemp("cdk.out.overlap"))


@pytest.fixture(scope="module")
def new_only(tmp_path_factory: pytest.TempPathFactory, new_manifest: Path) -> Synth:
    return _synth({**BASE_CONTEXT, "pcrManifest": str(new_manifest)}, tmp_path_factory.mktemp("cdk.out.new"))


@pytest.fixture(scope="module", params=["old", "old+new", "new"])
def phase(request: pytest.FixtureRequest, new_manifest: Path) -> Phase:
    if request.param == "old":
        return Phase("old", request.getfixturevalue("synth"), (OLD,), (SAMPLE_MANIFEST,))
    if request.param == "old+new":
        paths = (SAMPLE_MANIFEST, new_manifest)
        return Phase("old+new", request.getfixturevalue("overlap"), (OLD, NEW), paths)
    return Phase("new", request.getfixturevalue("new_only"), (NEW,), (new_manifest,))


def _model_key(s: Synth) -> tuple[str, dict[str, Any]]:
    return s.model_key()


def _releases(s: Synth) -> list[dict[str, Any]]:
    statements = _model_key(s)[1]["Properties"]["KeyPolicy"]["Statement"]
    return [st for st in statements if st["Sid"].startswith("ReleaseToAttestedEnclave")]


def _allowed(s: Synth, pcrs: dict[int, bytes]) -> bool:
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/nitrovault-enclave-host/i-0123456789abcdef0"
    request = build_request_context("Decrypt", session, KEY_ARN, encryption_context=CONTEXT,
                                    attestation_pcrs=pcrs)
    return evaluate_key_policy(_model_key(s)[1]["Properties"]["KeyPolicy"], request).allowed


# -- every phase ---------------------------------------------------------------------------------------------


def test_phase_holds_exactly_its_sets_in_order(phase: Phase) -> None:
    releases = _releases(phase.synth)
    assert [r["Sid"] for r in releases] == ["ReleaseToAttestedEnclave", "ReleaseToAttestedEnclave2"][
        : len(phase.expected)
    ]
    for statement, manifest in zip(releases, phase.expected, strict=True):
        assert statement["Condition"]["StringEqualsIgnoreCase"] == {
            f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in manifest.pcrs.items()
        }
        assert statement["Principal"] == {"AWS": [f"arn:aws:iam::{ACCOUNT}:role/nitrovault-enclave-host"]}
    statements = _model_key(phase.synth)[1]["Properties"]["KeyPolicy"]["Statement"]
    assert statements[-1]["Sid"] == "DenyDecryptWithoutAttestation"
    outputs = phase.synth.template.to_json()["Outputs"]
    assert outputs["ModelKeyReleaseSets"]["Value"] == str(len(phase.expected))


def test_phase_lets_in_exactly_its_images(phase: Phase) -> None:
    for manifest in (OLD, NEW):
        assert _allowed(phase.synth, dict(manifest.pcrs)) is (manifest in phase.expected), manifest
    mixed = {**OLD.pcrs, 1: NEW.pcrs[1]}  # PCR0 of the old image, PCR1 of the new
    assert not _allowed(phase.synth, mixed)


def test_phase_is_cdk_nag_clean(phase: Phase) -> None:
    annotations = Annotations.from_stack(phase.synth.stack)
    assert annotations.find_error("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    assert annotations.find_warning("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    report = next(phase.synth.outdir.glob("AwsSolutions-*NagReport.csv")).read_text()
    assert "Non-Compliant" not in report and report.count('"Compliant"') > 20


def test_phase_is_policy_review_clean_at_synth_and_in_the_cli(phase: Phase) -> None:
    review = Match.string_like_regexp(ANNOTATION_PREFIX)
    annotations = Annotations.from_stack(phase.synth.stack)
    assert annotations.find_error("*", review) == [] and annotations.find_warning("*", review) == []
    # the docs' review step: against the manifest of every image the phase accepts
    args = ["policy", "review", str(phase.synth.outdir), "--fail-on", "low", "--format", "json"]
    for path in phase.paths:
        args += ["--pcr-manifest", str(path)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["findings"] == []
    # and with the manifest of an image the phase does not accept, it fails (the check is not vacuous)
    for missing in (m for m in (OLD, NEW, NEVER) if m not in phase.expected):
        path = phase.synth.outdir.parent / f"missing-{phase.name}-{missing.image_digest}.json"
        path.write_text(missing.dumps())
        result = CliRunner().invoke(cli_app, [*args, "--pcr-manifest", str(path)])
        assert result.exit_code == 3, result.output


def test_phase_is_cfn_lint_clean(phase: Phase) -> None:
    templates = sorted(phase.synth.outdir.glob("*.template.json"))
    assert templates
    proc = subprocess.run([str(CFN_LINT), "--format", "parseable", *map(str, templates)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert [line for line in out.splitlines() if ":E" in line] == [] and not proc.returncode & 2, out


# -- across phases -------------------------------------------------------------------------------------------


def test_the_key_is_the_same_resource_in_every_phase_only_its_policy_changes(
    synth: Synth, overlap: Synth, new_only: Synth
) -> None:
    (old_id, old_key), (mid_id, mid_key), (new_id, new_key) = map(_model_key, (synth, overlap, new_only))
    assert old_id == mid_id == new_id  # same logical id: CloudFormation updates it in place
    strip = [{k: v for k, v in r.items() if k != "Properties"} for r in (old_key, mid_key, new_key)]
    assert strip[0] == strip[1] == strip[2]  # DependsOn, DeletionPolicy, ...
    props = [
        {k: v for k, v in r["Properties"].items() if k != "KeyPolicy"} for r in (old_key, mid_key, new_key)
    ]
    assert props[0] == props[1] == props[2]
    # the overlap is the old policy with the new image's statement added, nothing else
    old_statements = old_key["Properties"]["KeyPolicy"]["Statement"]
    mid_statements = mid_key["Properties"]["KeyPolicy"]["Statement"]
    assert [s for s in mid_statements if s["Sid"] != "ReleaseToAttestedEnclave2"] == old_statements
    # and the new-only policy is the overlap without the old image's statement (renumbered)
    renumbered = {**mid_statements[3], "Sid": "ReleaseToAttestedEnclave"}
    assert new_key["Properties"]["KeyPolicy"]["Statement"] == [*mid_statements[:2], renumbered,
                                                                 *mid_statements[4:]]


def test_outputs_name_the_same_key_in_every_phase(synth: Synth, overlap: Synth, new_only: Synth) -> None:
    values = [s.template.to_json()["Outputs"]["ModelKeyArn"]["Value"] for s in (synth, overlap, new_only)]
    assert values[0] == values[1] == values[2] == {"Fn::GetAtt": [_model_key(synth)[0], "Arn"]}


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory, new_manifest: Path) -> Synth:
    context = {**BASE_CONTEXT, "pcrManifest": f"{SAMPLE_MANIFEST},{new_manifest}", "signerSet": "true"}
    return _synth(context, tmp_path_factory.mktemp("cdk.out.signer"))


def test_signer_set_phase_adds_one_pcr8_statement_and_stays_clean(signer: Synth) -> None:
    # both images are signed with the same certificate: one signer set after the two image sets
    releases = _releases(signer)
    assert [r["Sid"] for r in releases] == [
        "ReleaseToAttestedEnclave", "ReleaseToAttestedEnclave2", "ReleaseToAttestedEnclave3",
    ]
    assert releases[2]["Condition"]["StringEqualsIgnoreCase"] == {
        "kms:RecipientAttestation:PCR8": OLD.pcrs[8].hex()
    }
    assert signer.template.to_json()["Outputs"]["ModelKeyReleaseSets"]["Value"] == "3"
    # a third image signed with the same certificate gets the key without a policy change
    assert _allowed(signer, dict(NEVER.pcrs))
    assert not _allowed(signer, {**NEVER.pcrs, 8: b"\x8b" * 48})
    annotations = Annotations.from_stack(signer.stack)
    for pattern in ("AwsSolutions-.*", ANNOTATION_PREFIX):
        assert annotations.find_error("*", Match.string_like_regexp(pattern)) == []
        assert annotations.find_warning("*", Match.string_like_regexp(pattern)) == []
