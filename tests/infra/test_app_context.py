"""Context handling of the CDK app entry (no synthesis: fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synth_context import BASE_CONTEXT

from infra.app import PLACEHOLDER_ACCOUNT, parse_argv, props_from_context
from nitrovault.errors import ConfigError


def test_context_builds_props() -> None:
    props = props_from_context(BASE_CONTEXT, env={})
    assert props.account == "111122223333" and props.region == "us-east-1"
    assert props.encryption_context == {"model": "resnet", "version": "7"}
    assert props.availability_zones == ("us-east-1a", "us-east-1b", "us-east-1c")
    assert props.admin_deploy_role_arn.endswith(":role/cdk-hnb659fds-cfn-exec-role-111122223333-us-east-1")


def test_pcr_manifest_is_required() -> None:
    with pytest.raises(ConfigError, match="pcrManifest is required"):
        props_from_context({k: v for k, v in BASE_CONTEXT.items() if k != "pcrManifest"}, env={})


def test_debug_manifest_is_refused_without_the_unsafe_flag(tmp_path: Path) -> None:
    manifest = tmp_path / "debug.json"
    manifest.write_text(json.dumps({"pcrs": {str(i): "00" * 48 for i in (0, 1, 2)}}))
    with pytest.raises(ConfigError, match="debug-mode"):
        props_from_context({**BASE_CONTEXT, "pcrManifest": str(manifest)}, env={})
    with pytest.raises(ConfigError, match="debug-mode"):
        props_from_context(
            {**BASE_CONTEXT, "pcrManifest": str(manifest), "unsafeAllowDebugPcrs": "false"}, env={}
        )


def test_manifest_without_pcr2_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "nopcr2.json"
    manifest.write_text(json.dumps({"pcrs": {"0": "11" * 48, "1": "22" * 48}}))
    with pytest.raises(ConfigError, match="PCR0, PCR1 and PCR2"):
        props_from_context({**BASE_CONTEXT, "pcrManifest": str(manifest)}, env={})


def test_account_must_be_12_digits_and_defaults_to_placeholder() -> None:
    with pytest.raises(ConfigError, match="12 digits"):
        props_from_context({**BASE_CONTEXT, "account": "1234"}, env={})
    no_account = {k: v for k, v in BASE_CONTEXT.items() if k != "account"}
    assert props_from_context(no_account, env={}).account == PLACEHOLDER_ACCOUNT
    assert (
        props_from_context(no_account, env={"CDK_DEFAULT_ACCOUNT": "444455556666"}).account == "444455556666"
    )


def test_retired_certificate_arn_is_refused_not_ignored() -> None:
    # The load balancer no longer terminates TLS: a pipeline still passing a certificate must hear so.
    arn = "arn:aws:acm:us-east-1:111122223333:certificate/11111111-2222-3333-4444-555555555555"
    with pytest.raises(ConfigError, match=r"certificateArn is no longer used.*inside the enclave"):
        props_from_context({**BASE_CONTEXT, "certificateArn": arn}, env={})


def test_bad_flags_and_numbers_are_refused() -> None:
    with pytest.raises(ConfigError, match="true or false"):
        props_from_context({**BASE_CONTEXT, "unsafeAllowDebugPcrs": "maybe"}, env={})
    with pytest.raises(ConfigError, match="integer"):
        props_from_context({**BASE_CONTEXT, "enclaveMemoryMib": "lots"}, env={})


def test_argv_parsing() -> None:
    assert parse_argv(["-c", "pcrManifest=m.json", "--context=region=eu-west-1", "--context", "a=b=c"]) == {
        "pcrManifest": "m.json",
        "region": "eu-west-1",
        "a": "b=c",
    }
    with pytest.raises(ConfigError):
        parse_argv(["pcrManifest=m.json"])
    with pytest.raises(ConfigError):
        parse_argv(["-c", "novalue"])
