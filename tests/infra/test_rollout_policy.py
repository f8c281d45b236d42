"""Several measurement sets in the model key policy (no synthesis: fast).

The builder (``nitrovault.policy.build.model_key_policy``): one Allow Decrypt statement per accepted set,
one value per PCR, Sids ``ReleaseToAttestedEnclave``, ``...2``, ``...3``; the single-set policy is what it
was; signer sets (PCR8, optionally PCR3); every refusal (debug, duplicate, malformed, mixed arguments) has
its own test. Then the manifest's signer set and the CDK app's context (several manifests, firstDeploy,
signerSet). The evaluator (the one the KMS emulator uses) proves who is let in: old and new images in the
overlap, never a mix of the two.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from synth_context import BASE_CONTEXT, SAMPLE_MANIFEST

from infra.app import props_from_context
from infra.pcr_manifest import load_pcr_manifests
from nitrovault.errors import ConfigError, PolicyError
from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest, load_manifest

ACCOUNT = "111122223333"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/"
ENCLAVE = f"{ROLE}nitrovault-enclave-host"
CONTEXT = {"model": "resnet", "version": "7"}
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
SIGNING = bytes.fromhex("8a" * 48)
ROLE_PCR3 = bytes.fromhex("3c" * 48)
OLD = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: SIGNING}
NEW = {0: b"\x20" * 48, 1: b"\x21" * 48, 2: b"\x22" * 48, 8: SIGNING}
THIRD = {0: b"\x30" * 48, 1: b"\x31" * 48, 2: b"\x32" * 48}


def policy(**sets: Any) -> dict[str, Any]:
    return model_key_policy(
        account_id=ACCOUNT,
        admin_arns=[f"{ROLE}nitrovault-key-admin"],
        sealer_arns=[f"{ROLE}nitrovault-sealer"],
        enclave_role_arns=[ENCLAVE],
        encryption_context=CONTEXT,
        **sets,
    )


def releases(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["Statement"] if s["Sid"].startswith("ReleaseToAttestedEnclave")]


def bound(statement: dict[str, Any]) -> dict[int, bytes]:
    pcrs = statement["Condition"]["StringEqualsIgnoreCase"]
    return {int(k.rsplit("PCR", 1)[1]): bytes.fromhex(v) for k, v in pcrs.items()}


def allowed(doc: dict[str, Any], pcrs: dict[int, bytes] | None) -> bool:
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/nitrovault-enclave-host/i-0123456789abcdef0"
    request = build_request_context("Decrypt", session, KEY_ARN, encryption_context=CONTEXT,
                                    attestation_pcrs=pcrs)
    return evaluate_key_policy(doc, request).allowed


# -- one set: unchanged --------------------------------------------------------------------------------------


def test_one_set_is_the_same_policy_whichever_way_it_is_passed() -> None:
    single = policy(pcrs=OLD)
    assert json.dumps(policy(pcr_sets=[OLD])) == json.dumps(single)
    assert [s["Sid"] for s in single["Statement"]] == [
        "KeyAdministration", "SealModel", "ReleaseToAttestedEnclave", "DenyDecryptWithoutAttestation",
    ]


# -- several sets --------------------------------------------------------------------------------------------


def test_each_set_is_its_own_statement_with_one_value_per_pcr() -> None:
    doc = policy(pcr_sets=[OLD, NEW, THIRD])
    sids = [s["Sid"] for s in doc["Statement"]]
    assert sids == [
        "KeyAdministration", "SealModel", "ReleaseToAttestedEnclave", "ReleaseToAttestedEnclave2",
        "ReleaseToAttestedEnclave3", "DenyDecryptWithoutAttestation",
    ]
    first = releases(doc)[0]
    for statement, expected in zip(releases(doc), (OLD, NEW, THIRD), strict=True):
        assert bound(statement) == expected
        assert all(isinstance(v, str) for v in statement["Condition"]["StringEqualsIgnoreCase"].values())
        # everything but the PCRs is the first statement's: principal, action, encryption context
        assert {k: v for k, v in statement.items() if k not in ("Sid", "Condition")} == {
            k: v for k, v in first.items() if k not in ("Sid", "Condition")
        }
        assert statement["Condition"]["StringEquals"] == first["Condition"]["StringEquals"]
    assert doc["Statement"][-1]["Effect"] == "Deny"


def test_old_and_new_are_let_in_a_mix_of_the_two_is_not() -> None:
    doc = policy(pcr_sets=[OLD, NEW])
    assert allowed(doc, OLD) and allowed(doc, NEW)
    assert not allowed(doc, {**OLD, 1: NEW[1]})  # PCR0 of the old image, PCR1 of the new one
    assert not allowed(doc, {**NEW, 2: OLD[2]})
    assert not allowed(doc, None)  # the explicit Deny still refuses unattested Decrypt
    after = policy(pcr_sets=[NEW])
    assert allowed(after, NEW) and not allowed(after, OLD)


def test_no_set_means_no_release_statement_and_nobody_decrypts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nitrovault.policy.build"):
        doc = policy(pcr_sets=[])
    assert [s["Sid"] for s in doc["Statement"]] == [
        "KeyAdministration", "SealModel", "DenyDecryptWithoutAttestation",
    ]
    assert not allowed(doc, OLD) and not allowed(doc, None)
    assert any("no release statement" in r.getMessage() for r in caplog.records)


# -- signer sets ---------------------------------------------------------------------------------------------


def test_a_signer_set_lets_in_every_image_signed_with_that_certificate() -> None:
    doc = policy(pcr_sets=[OLD], signer_sets=[{8: SIGNING, 3: ROLE_PCR3}])
    signer = releases(doc)[1]
    assert signer["Sid"] == "ReleaseToAttestedEnclave2"
    assert bound(signer) == {3: ROLE_PCR3, 8: SIGNING}
    other_image = {**THIRD, 8: SIGNING, 3: ROLE_PCR3}  # new PCR0/1/2, same signer, same parent role
    assert allowed(doc, other_image)
    assert not allowed(doc, {**other_image, 8: b"\x8b" * 48})  # signed with another certificate
    assert not allowed(doc, {**other_image, 3: b"\x3d" * 48})  # on a parent with another role
    assert not allowed(doc, THIRD)  # unsigned


@pytest.mark.parametrize(
    ("signer", "message"),
    [
        ({3: ROLE_PCR3}, "binds PCR8"),
        ({8: SIGNING, 0: OLD[0]}, r"only PCR8 and optionally PCR3, not \[0\]"),
        ({8: SIGNING, 4: b"\x04" * 48}, r"PCR4 \(the instance id\)"),
        ({8: bytes(48)}, "debug-mode"),
        ({8: SIGNING[:47]}, "48 bytes"),
    ],
)
def test_malformed_or_debug_signer_sets_are_refused(signer: dict[int, bytes], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        policy(pcr_sets=[OLD], signer_sets=[signer])


# -- refusals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_debug_set_is_refused_wherever_it_is(index: int) -> None:
    debug = {**NEW, index: bytes(48)}
    with pytest.raises(PolicyError, match=rf"debug-mode.*PCR{index} of measurement set 2"):
        policy(pcr_sets=[OLD, debug])


def test_a_debug_set_passes_only_unsafely_and_loudly(caplog: pytest.LogCaptureFixture) -> None:
    debug = {i: bytes(48) for i in (0, 1, 2)}
    with caplog.at_level(logging.WARNING):
        doc = policy(pcr_sets=[OLD, debug], unsafe_allow_debug_pcrs=True)
    assert bound(releases(doc)[1]) == debug
    assert any("UNSAFE" in r.getMessage() for r in caplog.records)


def test_duplicate_sets_are_refused() -> None:
    with pytest.raises(PolicyError, match="measurement set 3 is the same as set 1"):
        policy(pcr_sets=[OLD, NEW, dict(OLD)])
    with pytest.raises(PolicyError, match="set 3 is the same as set 2"):
        policy(pcr_sets=[OLD], signer_sets=[{8: SIGNING}, {8: SIGNING}])


def test_an_image_set_missing_a_pcr_or_with_a_short_one_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"PCR0, PCR1 and PCR2 \(missing \[1\], measurement set 2\)"):
        policy(pcr_sets=[OLD, {0: NEW[0], 2: NEW[2]}])
    with pytest.raises(PolicyError, match="PCR2 must be 48 bytes, got 47"):
        policy(pcr_sets=[{**OLD, 2: OLD[2][:47]}])
    with pytest.raises(PolicyError, match=r"unexpected PCR indexes \[5\]"):
        policy(pcr_sets=[{**OLD, 5: b"\x05" * 48}])


def test_pcrs_and_pcr_sets_are_one_or_the_other() -> None:
    with pytest.raises(PolicyError, match="not both"):
        policy(pcrs=OLD, pcr_sets=[NEW])
    with pytest.raises(PolicyError, match="either as pcrs="):
        policy()
    with pytest.raises(PolicyError, match="lists of PCR sets"):
        policy(pcr_sets=OLD)  # one set where a list of sets belongs


# -- the manifest's signer set -------------------------------------------------------------------------------


def test_manifest_signer_set_is_pcr8_and_pcr3_never_pcr4() -> None:
    sample = load_manifest(SAMPLE_MANIFEST)
    assert sample.signer_pcrs() == {8: sample.pcrs[8]}
    with_role = PcrManifest(pcrs={**sample.pcrs, 3: ROLE_PCR3, 4: b"\x04" * 48})
    assert with_role.signer_pcrs() == {3: ROLE_PCR3, 8: sample.pcrs[8]}


def test_an_unsigned_manifest_has_no_signer_set() -> None:
    for pcrs in (THIRD, {**THIRD, 8: bytes(48)}):
        manifest = PcrManifest(pcrs=pcrs)
        assert not manifest.is_signed
        with pytest.raises(ConfigError, match="not signed"):
            manifest.signer_pcrs()


# -- the CDK app's context -----------------------------------------------------------------------------------


def write_manifest(path: Path, pcrs: dict[int, bytes]) -> Path:
    path.write_text(PcrManifest(pcrs=pcrs).dumps())
    return path


def test_several_manifests_comma_separated_or_as_a_list(tmp_path: Path) -> None:
    new = write_manifest(tmp_path / "new.json", NEW)
    values = (f"{SAMPLE_MANIFEST},{new}", f" {SAMPLE_MANIFEST} , {new} ", [str(SAMPLE_MANIFEST), str(new)])
    for value in values:
        props = props_from_context({**BASE_CONTEXT, "pcrManifest": value}, env={})
        assert [dict(m.pcrs) for m in props.manifests] == [dict(load_manifest(SAMPLE_MANIFEST).pcrs), NEW]
        assert props.signer_sets == ()


def test_one_manifest_still_works() -> None:
    props = props_from_context(BASE_CONTEXT, env={})
    assert props.manifests == (load_manifest(SAMPLE_MANIFEST),)


def test_the_same_image_twice_is_refused(tmp_path: Path) -> None:
    copy = write_manifest(tmp_path / "copy.json", dict(load_manifest(SAMPLE_MANIFEST).pcrs))
    with pytest.raises(ConfigError, match="hold the same PCRs"):
        props_from_context({**BASE_CONTEXT, "pcrManifest": f"{SAMPLE_MANIFEST},{copy}"}, env={})


def test_a_debug_manifest_among_several_is_refused(tmp_path: Path) -> None:
    debug = write_manifest(tmp_path / "debug.json", {i: bytes(48) for i in (0, 1, 2)})
    with pytest.raises(ConfigError, match="debug-mode"):
        load_pcr_manifests([SAMPLE_MANIFEST, debug])
    with pytest.raises(ConfigError, match="at least one"):
        load_pcr_manifests([])


def test_first_deploy_reads_no_manifest(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="infra.app"):
        props = props_from_context({**BASE_CONTEXT, "firstDeploy": "true"}, env={})
    assert props.manifests == () and props.signer_sets == ()
    assert any("releases to no enclave image" in r.getMessage() for r in caplog.records)
    # the manifest cdk.json names by default is not even opened
    props = props_from_context({**BASE_CONTEXT, "firstDeploy": "true", "pcrManifest": "/nonexistent"}, env={})
    assert props.manifests == ()


def test_without_a_manifest_the_app_points_at_first_deploy() -> None:
    with pytest.raises(ConfigError, match="firstDeploy=true"):
        props_from_context({**BASE_CONTEXT, "pcrManifest": " , "}, env={})
    with pytest.raises(ConfigError, match="true or false"):
        props_from_context({**BASE_CONTEXT, "firstDeploy": "soon"}, env={})


def test_signer_set_one_per_signing_certificate(tmp_path: Path) -> None:
    sample = load_manifest(SAMPLE_MANIFEST)
    same_signer = write_manifest(tmp_path / "new.json", {**NEW, 8: sample.pcrs[8]})
    props = props_from_context(
        {**BASE_CONTEXT, "pcrManifest": f"{SAMPLE_MANIFEST},{same_signer}", "signerSet": "true"}, env={}
    )
    assert props.signer_sets == ({8: sample.pcrs[8]},)
    other_signer = write_manifest(tmp_path / "other.json", NEW)
    props = props_from_context(
        {**BASE_CONTEXT, "pcrManifest": f"{SAMPLE_MANIFEST},{other_signer}", "signerSet": "true"}, env={}
    )
    assert props.signer_sets == ({8: sample.pcrs[8]}, {8: SIGNING})


def test_signer_set_needs_signed_manifests_and_an_image(tmp_path: Path) -> None:
    unsigned = write_manifest(tmp_path / "unsigned.json", THIRD)
    with pytest.raises(ConfigError, match="not signed"):
        props_from_context({**BASE_CONTEXT, "pcrManifest": str(unsigned), "signerSet": "true"}, env={})
    with pytest.raises(ConfigError, match="cannot go with firstDeploy"):
        props_from_context({**BASE_CONTEXT, "firstDeploy": "true", "signerSet": "true"}, env={})
