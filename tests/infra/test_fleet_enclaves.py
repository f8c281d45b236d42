"""Several enclaves per instance (docs/deploy.md, "Several enclaves per instance").

Pure: the allocator reserves count x the per-enclave memory and vCPUs; the instance type's size gives its
vCPUs and the enclaves must leave the parent one; counts outside 1..MAX_ENCLAVES and odd vCPU counts are
refused. On a synth with two enclaves of 2 vCPUs / 2 GiB on an m6i.2xlarge (built like ``infra.app`` does,
since the app has no context key for the count yet): the allocator file, the parent config the parent
loads (one launcher per CID, each with its own share), the boot alarm's default scaled by the count, and
cdk-nag clean. A stack whose enclaves would take every vCPU does not synthesize.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match, Template
from synth_context import BASE_CONTEXT, REGION, Synth

from infra.constructs.enclave_host import (
    ALLOCATOR_PATH,
    PARENT_CONFIG_PATH,
    allocator_yaml,
    check_enclave_fit,
    instance_vcpus,
    parent_config,
)
from parent_app.config import MAX_ENCLAVES, ParentConfig

# -- pure ----------------------------------------------------------------------------------------------------


def test_the_allocator_reserves_every_enclaves_share() -> None:
    assert allocator_yaml(4096, 2) == "---\nmemory_mib: 4096\ncpu_count: 2\n"
    assert allocator_yaml(2048, 2, 3) == "---\nmemory_mib: 6144\ncpu_count: 6\n"
    assert allocator_yaml(1024, 4, MAX_ENCLAVES) == f"---\nmemory_mib: {1024 * MAX_ENCLAVES}\ncpu_count: 64\n"


@pytest.mark.parametrize("count", [0, -1, MAX_ENCLAVES + 1, True, 2.0])
def test_the_allocator_refuses_a_count_the_parent_would(count: Any) -> None:
    with pytest.raises(ValueError, match="enclaves per instance"):
        allocator_yaml(4096, 2, count)


@pytest.mark.parametrize(("memory", "cpus"), [(4096, 3), (4096, 1), (4096, 0), (32, 2)])
def test_the_allocator_refuses_partial_cores_and_tiny_memory(memory: int, cpus: int) -> None:
    with pytest.raises(ValueError, match="even number"):
        allocator_yaml(memory, cpus, 2)


@pytest.mark.parametrize(
    ("instance_type", "vcpus"),
    [
        ("m6i.xlarge", 4),
        ("m6i.2xlarge", 8),
        ("c6i.large", 2),
        ("r6i.12xlarge", 48),
        ("m7g.16xlarge", 64),
        ("m7i-flex.xlarge", 4),
        ("m6i.metal", None),
        ("t3.medium", None),
        ("xlarge", None),
        ("m6i.2xlarge; rm", None),
    ],
)
def test_vcpus_from_the_size_name(instance_type: str, vcpus: int | None) -> None:
    assert instance_vcpus(instance_type) == vcpus


def test_the_enclaves_must_leave_the_parent_a_vcpu() -> None:
    check_enclave_fit("m6i.xlarge", 2, 1)  # the default: 2 of 4
    check_enclave_fit("m6i.2xlarge", 2, 3)  # 6 of 8
    check_enclave_fit("m6i.2xlarge", 6, 1)
    for instance_type, cpus, count in (("m6i.xlarge", 2, 2), ("m6i.2xlarge", 2, 4), ("m6i.xlarge", 4, 1)):
        with pytest.raises(ValueError, match="the parent needs at least one"):
            check_enclave_fit(instance_type, cpus, count)


def test_an_unknown_size_is_not_checked_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        check_enclave_fit("m6i.metal", 2, 16)
    assert any("cannot tell the vCPUs of m6i.metal" in r.getMessage() for r in caplog.records)


def test_the_parent_config_names_the_count_and_loads_with_one_cid_each(tmp_path: Path) -> None:
    from parent_app.main import _launcher

    raw = parent_config(
        region=REGION,
        bucket_name="b",
        relay_port=50051,
        health_port=8080,
        memory_mib=2048,
        cpu_count=2,
        count=3,
    )
    assert raw["enclave"]["count"] == 3
    path = tmp_path / "parent.json"
    path.write_text(json.dumps(raw))
    config = ParentConfig.load(path)
    assert config.enclave_cids == (16, 17, 18)
    argvs = [_launcher(config, cid).argv for cid in config.enclave_cids]  # type: ignore[attr-defined]
    assert [a[a.index("--enclave-cid") + 1] for a in argvs] == ["16", "17", "18"]
    assert all(a[a.index("--cpu-count") + 1] == "2" and a[a.index("--memory") + 1] == "2048" for a in argvs)
    with pytest.raises(ValueError, match="enclaves per instance"):
        parent_config(
            region=REGION,
            bucket_name="b",
            relay_port=50051,
            health_port=8080,
            memory_mib=2048,
            cpu_count=2,
            count=0,
        )


# -- two enclaves per host, synthesized ----------------------------------------------------------------------


def _build(tmp: Path, **changes: Any) -> Synth:
    """The app as ``infra.app.build_app`` builds it, from props (no context key for the count yet)."""
    from aws_cdk import App, Aspects
    from cdk_nag import AwsSolutionsChecks

    from infra.app import props_from_context
    from infra.nag import apply_suppressions
    from infra.review_aspect import KeyPolicyReviewAspect
    from infra.stacks.nitrovault_stack import NitrovaultStack

    props = replace(props_from_context(BASE_CONTEXT, env={}), **changes)
    app = App(outdir=str(tmp))
    stack = NitrovaultStack(app, "Nitrovault", props=props)
    apply_suppressions(stack)
    Aspects.of(app).add(KeyPolicyReviewAspect(props.manifests[0], model_keys_only=False))
    Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    app.synth()
    return Synth(app=app, stack=stack, template=Template.from_stack(stack), outdir=tmp)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return _build(
        tmp_path_factory.mktemp("two-enclaves"),
        instance_type="m6i.2xlarge",
        enclave_count=2,
        enclave_memory_mib=2048,
    )


def _file(s: Synth, path: str) -> str:
    return s.boot_file(path)


def test_two_enclaves_reserve_twice_the_share_on_a_larger_instance(two: Synth) -> None:
    assert _file(two, ALLOCATOR_PATH) == "---\nmemory_mib: 4096\ncpu_count: 4"
    (template,) = two.of_type("AWS::EC2::LaunchTemplate").values()
    assert template["Properties"]["LaunchTemplateData"]["InstanceType"] == "m6i.2xlarge"


def test_two_enclaves_parent_config_loads_with_two_cids(two: Synth, tmp_path: Path) -> None:
    path = tmp_path / "parent.json"
    path.write_text(_file(two, PARENT_CONFIG_PATH))
    config = ParentConfig.load(path)
    assert config.enclave_count == 2 and config.enclave_cids == (16, 17)
    assert (config.enclave["cpu_count"], config.enclave["memory_mib"]) == (2, 2048)  # per enclave


def test_the_boot_alarm_default_counts_every_enclave(two: Synth, synth: Synth) -> None:
    def threshold(s: Synth) -> float:
        (alarm,) = [
            a["Properties"]
            for a in s.of_type("AWS::CloudWatch::Alarm").values()
            if a["Properties"]["MetricName"] == "AttestedModelKeyDecrypts"
        ]
        return float(alarm["Threshold"])

    assert threshold(synth) == 3 * 4  # one enclave per host, max 4 hosts
    assert threshold(two) == 3 * 4 * 2


def test_two_enclaves_stack_is_cdk_nag_clean(two: Synth) -> None:
    annotations = Annotations.from_stack(two.stack)
    assert annotations.find_error("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    assert annotations.find_warning("*", Match.string_like_regexp("AwsSolutions-.*")) == []


def test_enclaves_that_take_every_vcpu_do_not_synthesize(tmp_path: Path) -> None:
    # Negative control: two 2-vCPU enclaves on the default m6i.xlarge (4 vCPUs) leave the parent none.
    with pytest.raises(ValueError, match="the parent needs at least one"):
        _build(tmp_path, enclave_count=2)


def test_the_enclave_count_comes_from_context() -> None:
    from infra.app import props_from_context
    from nitrovault.errors import ConfigError

    assert props_from_context(BASE_CONTEXT, env={}).enclave_count == 1
    assert props_from_context({**BASE_CONTEXT, "enclaveCount": "2"}, env={}).enclave_count == 2
    with pytest.raises(ConfigError, match="enclaveCount"):
        props_from_context({**BASE_CONTEXT, "enclaveCount": "two"}, env={})
