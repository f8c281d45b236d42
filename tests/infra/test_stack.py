"""Assertions on the synthesized stack (one synth per session, see conftest), by property, never by
hashed logical id; plus cdk-nag, cfn-lint and the policy evaluator on the synthesized key policy."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match
from synth_context import ACCOUNT, REGION, SAMPLE_MANIFEST, Synth

from infra.pcr_manifest import load_pcr_manifest
from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.cfn import render_text

CFN_LINT = Path(sys.executable).with_name("cfn-lint")
MANIFEST = load_pcr_manifest(SAMPLE_MANIFEST)
ROLE = f"arn:aws:iam::{ACCOUNT}:role/"
CONTEXT = {"model": "resnet", "version": "7"}


def _model_key_id(s: Synth) -> str:
    keys = [
        k
        for k, r in s.of_type("AWS::KMS::Key").items()
        if r["Properties"]["KeyPolicy"].get("Id") == "nitrovault-model-key"
    ]
    assert len(keys) == 1
    return keys[0]


def _model_key(s: Synth) -> dict[str, Any]:
    return dict(s.resources[_model_key_id(s)])


def _logical_id(s: Synth, kind: str, **props: Any) -> str:
    found = [
        k for k, r in s.of_type(kind).items() if all(r["Properties"].get(p) == v for p, v in props.items())
    ]
    assert len(found) == 1, found
    return found[0]


# -- model key --------------------------------------------------------------------------------------------


def test_model_key_rotates_and_is_retained(synth: Synth) -> None:
    key = _model_key(synth)
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Retain"


def test_model_key_policy_is_exactly_the_builders(synth: Synth) -> None:
    expected = model_key_policy(
        account_id=ACCOUNT,
        admin_arns=[f"{ROLE}nitrovault-key-admin", f"{ROLE}cdk-hnb659fds-cfn-exec-role-{ACCOUNT}-{REGION}"],
        sealer_arns=[f"{ROLE}nitrovault-sealer"],
        enclave_role_arns=[f"{ROLE}nitrovault-enclave-host"],
        pcrs=MANIFEST.pcrs,
        encryption_context=CONTEXT,
    )
    assert _model_key(synth)["Properties"]["KeyPolicy"] == expected
    assert synth.stack.model_key.policy == expected


def test_release_statement_binds_every_manifest_pcr_case_insensitively(synth: Synth) -> None:
    pcr_condition = {f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in MANIFEST.pcrs.items()}
    synth.template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "EnableKeyRotation": True,
            "KeyPolicy": Match.object_like(
                {
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {
                                    "Sid": "ReleaseToAttestedEnclave",
                                    "Effect": "Allow",
                                    "Action": "kms:Decrypt",
                                    "Principal": {"AWS": [f"{ROLE}nitrovault-enclave-host"]},
                                    "Condition": {
                                        "StringEquals": {
                                            "kms:EncryptionContext:model": "resnet",
                                            "kms:EncryptionContext:version": "7",
                                        },
                                        "StringEqualsIgnoreCase": pcr_condition,
                                    },
                                }
                            )
                        ]
                    )
                }
            ),
        },
    )
    assert set(pcr_condition) == {f"kms:RecipientAttestation:PCR{i}" for i in (0, 1, 2, 8)}


def test_model_key_policy_never_names_the_account_root(synth: Synth) -> None:
    text = json.dumps(_model_key(synth)["Properties"]["KeyPolicy"])
    assert ":root" not in text and "AWS::AccountId" not in text and "Fn::Join" not in text
    for statement in _model_key(synth)["Properties"]["KeyPolicy"]["Statement"]:
        if statement["Effect"] == "Allow":
            assert statement["Principal"] != {"AWS": "*"}


def test_model_key_depends_on_the_roles_it_names(synth: Synth) -> None:
    depends = set(_model_key(synth).get("DependsOn", []))
    for name in ("nitrovault-enclave-host", "nitrovault-key-admin", "nitrovault-sealer"):
        assert _logical_id(synth, "AWS::IAM::Role", RoleName=name) in depends


def test_model_key_has_its_alias(synth: Synth) -> None:
    synth.template.has_resource_properties("AWS::KMS::Alias", {"AliasName": "alias/nitrovault/resnet"})


# -- the synthesized key policy, evaluated ------------------------------------------------------------------


def _decide(synth: Synth, action: str, principal: str, **kw: Any) -> Any:
    policy = _model_key(synth)["Properties"]["KeyPolicy"]
    key_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
    return evaluate_key_policy(policy, build_request_context(action, principal, key_arn, **kw))


def _session(role: str) -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/i-0123456789abcdef0"


def test_attested_enclave_with_manifest_pcrs_may_decrypt(synth: Synth) -> None:
    decision = _decide(
        synth,
        "Decrypt",
        _session("nitrovault-enclave-host"),
        encryption_context=CONTEXT,
        attestation_pcrs=dict(MANIFEST.pcrs),
    )
    assert decision.allowed, decision.reason


def test_wrong_pcr0_is_denied(synth: Synth) -> None:
    pcrs = dict(MANIFEST.pcrs)
    pcrs[0] = bytes(47) + b"\x01"
    decision = _decide(
        synth,
        "Decrypt",
        _session("nitrovault-enclave-host"),
        encryption_context=CONTEXT,
        attestation_pcrs=pcrs,
    )
    assert not decision.allowed


def test_enclave_role_without_attestation_is_explicitly_denied(synth: Synth) -> None:
    decision = _decide(synth, "Decrypt", _session("nitrovault-enclave-host"), encryption_context=CONTEXT)
    assert not decision.allowed and decision.deny


def test_canary_role_is_denied_and_absent_from_the_key_policy(synth: Synth) -> None:
    decision = _decide(
        synth,
        "Decrypt",
        _session("nitrovault-identity-canary"),
        encryption_context=CONTEXT,
        attestation_pcrs=dict(MANIFEST.pcrs),
    )
    assert not decision.allowed
    assert "identity-canary" not in json.dumps(_model_key(synth)["Properties"]["KeyPolicy"])


def test_admin_can_manage_but_not_decrypt(synth: Synth) -> None:
    admin = _session("nitrovault-key-admin")
    assert _decide(synth, "kms:PutKeyPolicy", admin).allowed
    assert not _decide(synth, "Decrypt", admin, encryption_context=CONTEXT).allowed
    assert not _decide(synth, "GenerateDataKey", admin, encryption_context=CONTEXT).allowed


def test_sealer_needs_the_model_context(synth: Synth) -> None:
    sealer = _session("nitrovault-sealer")
    assert _decide(synth, "GenerateDataKey", sealer, encryption_context=CONTEXT).allowed
    assert not _decide(synth, "GenerateDataKey", sealer, encryption_context={"model": "other"}).allowed
    assert not _decide(synth, "Decrypt", sealer, encryption_context=CONTEXT).allowed


# -- weights store ----------------------------------------------------------------------------------------


def _weights_bucket(synth: Synth) -> tuple[str, dict[str, Any]]:
    found = [
        (k, r)
        for k, r in synth.of_type("AWS::S3::Bucket").items()
        if "LoggingConfiguration" in r["Properties"]
        and r["Properties"]["LoggingConfiguration"].get("LogFilePrefix") == "weights/"
    ]
    assert len(found) == 1
    return found[0]


def test_weights_bucket_encryption_versioning_public_access_logging(synth: Synth) -> None:
    _, bucket = _weights_bucket(synth)
    props = bucket["Properties"]
    rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
    store_key = rule["ServerSideEncryptionByDefault"]["KMSMasterKeyID"]["Fn::GetAtt"][0]
    model_key_id = _model_key_id(synth)
    assert store_key != model_key_id  # the store key, not the model key
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert "DestinationBucketName" in props["LoggingConfiguration"]


def test_every_bucket_is_tls_only_and_none_is_publicly_readable(synth: Synth) -> None:
    # the weights store, its access-log bucket and the CloudTrail bucket (infra/constructs/boot_watch.py)
    policies = synth.of_type("AWS::S3::BucketPolicy")
    assert len(policies) == len(synth.of_type("AWS::S3::Bucket")) == 3
    for policy in policies.values():
        statements = policy["Properties"]["PolicyDocument"]["Statement"]
        assert any(
            s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
            for s in statements
        )
        assert not any(
            s["Effect"] == "Allow" and s.get("Principal") in ("*", {"AWS": "*"}) for s in statements
        )
    for bucket in synth.of_type("AWS::S3::Bucket").values():
        assert bucket["Properties"].get("AccessControl") != "PublicRead"


# -- enclave host -----------------------------------------------------------------------------------------


def _launch_template(synth: Synth) -> dict[str, Any]:
    (template,) = synth.of_type("AWS::EC2::LaunchTemplate").values()
    return dict(template["Properties"]["LaunchTemplateData"])


def test_launch_template_hardening(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::EC2::LaunchTemplate",
        {
            "LaunchTemplateData": Match.object_like(
                {
                    "InstanceType": "m6i.xlarge",
                    "EnclaveOptions": {"Enabled": True},
                    "MetadataOptions": Match.object_like(
                        {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}
                    ),
                    "BlockDeviceMappings": [
                        Match.object_like({"Ebs": Match.object_like({"Encrypted": True})})
                    ],
                    "IamInstanceProfile": Match.any_value(),
                }
            )
        },
    )
    assert "KeyName" not in _launch_template(synth)


def test_instance_role_is_the_release_role_and_uses_ssm(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "RoleName": "nitrovault-enclave-host",
            "AssumeRolePolicyDocument": Match.object_like(
                {"Statement": [Match.object_like({"Principal": {"Service": "ec2.amazonaws.com"}})]}
            ),
            "ManagedPolicyArns": [
                Match.object_like(
                    {
                        "Fn::Join": Match.array_with(
                            [Match.array_with([":iam::aws:policy/AmazonSSMManagedInstanceCore"])]
                        )
                    }
                )
            ],
        },
    )


def _user_data(synth: Synth) -> str:
    """The boot script with every ``{"Ref": X}`` rendered as ``<Ref:X>`` (``render_text``)."""
    return render_text(_launch_template(synth)["UserData"])


def _heredoc_body(script: str, path: str) -> str:
    head = f"cat > {path} <<'NITROVAULT_EOF'\n"
    assert script.count(head) == 1, f"{path} is not written exactly once"
    return script.split(head, 1)[1].split("\nNITROVAULT_EOF", 1)[0]


def _parent_json(synth: Synth, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    from infra.constructs.enclave_host import PARENT_CONFIG_PATH
    from parent_app.config import ParentConfig

    body = _heredoc_body(_user_data(synth), PARENT_CONFIG_PATH)
    path = tmp_path / "parent.json"
    path.write_text(body)
    return ParentConfig.load(path), json.loads(body)


def test_user_data_installs_cli_sizes_allocator_and_allows_only_kms(synth: Synth) -> None:
    script = _user_data(synth)
    assert "dnf install -y aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel" in script
    assert (
        _heredoc_body(script, "/etc/nitro_enclaves/allocator.yaml") == "---\nmemory_mib: 4096\ncpu_count: 2"
    )
    allowlist = _heredoc_body(script, "/etc/nitro_enclaves/vsock-proxy.yaml")
    # KMS, then the state store's endpoint (tests/infra/test_state_store.py), and nothing else
    kms = f"- {{address: kms.{REGION}.amazonaws.com, port: 443}}"
    assert allowlist.splitlines()[:2] == ["allowlist:", kms]
    assert len(allowlist.splitlines()) == 3 and "cache.amazonaws.com" not in allowlist.splitlines()[1]
    assert f"vsock-proxy 8000 kms.{REGION}.amazonaws.com 443" in script


def test_user_data_runs_the_parent_unit_the_real_parent_entry_point(synth: Synth) -> None:
    script = _user_data(synth)
    # the parent, and the lifecycle watcher that drains it (tests/infra/test_drain_stack.py)
    assert script.count("cat > /etc/systemd/system/nitrovault-") == 2
    unit = _heredoc_body(script, "/etc/systemd/system/nitrovault-parent.service")
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == "ExecStart=/opt/nitrovault/venv/bin/python -m parent_app /etc/nitrovault/parent.json"
    aws_units = "nitro-enclaves-allocator.service nitro-enclaves-vsock-proxy.service"
    assert f"After={aws_units}" in unit and f"Requires={aws_units}" in unit
    for aws_unit in aws_units.split():
        assert f"systemctl enable --now {aws_unit}" in script
    assert "systemctl enable --now nitrovault-parent.service" in script
    # the entry points that never existed are gone
    assert "parent_app.supervisor" not in script and "--eif" not in script
    assert "nitrovault-enclave.service" not in script
    # the wheelhouse provides the `parent_app` package the unit runs
    assert "/opt/nitrovault/venv/bin/pip install --no-index --find-links /opt/nitrovault/wheelhouse" in script


def test_parent_json_loads_as_parent_config_and_matches_the_stack(synth: Synth, tmp_path: Path) -> None:
    from parent_app.main import _launcher
    from parent_app.supervisor import NitroCliLauncher

    config, raw = _parent_json(synth, tmp_path)
    (target_group,) = synth.of_type("AWS::ElasticLoadBalancingV2::TargetGroup").values()
    port = target_group["Properties"]["Port"]
    health_port = target_group["Properties"]["HealthCheckPort"]
    # the TCP relay on the target port (TLS passes through to the enclave), health on the checked port
    assert config.listen == f"0.0.0.0:{port}" and port == 50051
    assert config.health_listen == f"0.0.0.0:{health_port}" and health_port == "8080"
    # the parent holds no TLS material and runs no gRPC server: the retired keys are not written
    assert not {"tls_cert", "tls_key", "max_concurrent_calls", "max_message_bytes"} & set(raw)
    assert config.region == REGION
    assert config.credentials == {"kind": "imds"}
    bucket_id, _ = _weights_bucket(synth)
    assert config.models == {"kind": "s3", "bucket": f"<Ref:{bucket_id}>", "prefix": "models/"}
    assert config.kms_proxy_target == ""  # AWS's vsock-proxy relays KMS in production
    assert config.enclave == {
        "kind": "nitro-cli",
        "eif": "/opt/nitrovault/enclave.eif",
        "cpu_count": 2,
        "memory_mib": 4096,
        "count": 1,
    }
    # the image the parent starts is the one the boot script fetched from the bucket
    assert f'aws s3 cp "s3://<Ref:{bucket_id}>/enclave/nitrovault.eif" /opt/nitrovault/enclave.eif' in (
        _user_data(synth)
    )
    launcher = _launcher(config, config.enclave_cid)
    assert isinstance(launcher, NitroCliLauncher)
    assert launcher.argv == [
        "nitro-cli",
        "run-enclave",
        "--eif-path",
        "/opt/nitrovault/enclave.eif",
        "--cpu-count",
        "2",
        "--memory",
        "4096",
        "--enclave-cid",
        str(config.enclave_cid),
    ]
    assert set(raw) <= set(type(config).__dataclass_fields__)


def test_parent_json_is_root_only(synth: Synth) -> None:
    script = _user_data(synth)
    created = script.index("install -m 0600 -o root -g root /dev/null /etc/nitrovault/parent.json")
    assert created < script.index("cat > /etc/nitrovault/parent.json")
    assert "chown root:root /etc/nitrovault/parent.json && chmod 0600 /etc/nitrovault/parent.json" in script
    assert "install -d -m 0700 -o root -g root /etc/nitrovault" in script


def test_log_agent_ships_the_parent_log_and_the_enclave_audit_lines(synth: Synth) -> None:
    agent = json.loads(
        _heredoc_body(_user_data(synth), "/opt/aws/amazon-cloudwatch-agent/etc/nitrovault.json")
    )
    collected = agent["logs"]["logs_collected"]["files"]["collect_list"]
    paths = [entry["file_path"] for entry in collected]
    assert paths == ["/var/log/nitrovault/parent.log", "/var/lib/nitrovault/audit/*/audit-*.jsonl"]
    unit = _heredoc_body(_user_data(synth), "/etc/systemd/system/nitrovault-parent.service")
    assert "StandardError=append:/var/log/nitrovault/parent.log" in unit


def test_parent_config_writes_the_relay_and_health_listeners_and_rejects_bad_values() -> None:
    from infra.constructs.enclave_host import parent_config
    from nitrovault.errors import ConfigError

    def build(
        region: str = REGION, relay_port: int = 50051, health_port: int = 8080, cpu_count: int = 2
    ) -> dict[str, Any]:
        return parent_config(
            region=region,
            bucket_name="b",
            relay_port=relay_port,
            health_port=health_port,
            memory_mib=4096,
            cpu_count=cpu_count,
        )

    config = build()
    assert config["listen"] == "0.0.0.0:50051" and config["health_listen"] == "0.0.0.0:8080"
    assert sorted(config) == [
        "audit_dir",
        "credentials",
        "drain_timeout_s",
        "enclave",
        "health_listen",
        "kms_proxy_target",
        "listen",
        "metrics_listen",
        "models",
        "region",
        "run_dir",
    ]
    with pytest.raises(ConfigError):
        build(region="us-east-1\nallowlist")
    with pytest.raises(ValueError, match="TCP port"):
        build(relay_port=70000)
    with pytest.raises(ValueError, match="TCP port"):
        build(health_port=0)
    with pytest.raises(ValueError, match="two ports"):
        build(health_port=50051)
    with pytest.raises(ValueError, match="even number"):
        build(cpu_count=3)


def test_parent_json_with_an_unknown_key_would_not_load(synth: Synth, tmp_path: Path) -> None:
    # Negative control for the ParentConfig check above: the loader does refuse a drifted schema.
    from infra.constructs.enclave_host import PARENT_CONFIG_PATH
    from nitrovault.errors import ConfigError
    from parent_app.config import ParentConfig

    raw = json.loads(_heredoc_body(_user_data(synth), PARENT_CONFIG_PATH))
    path = tmp_path / "drifted.json"
    path.write_text(json.dumps({**raw, "eif": "/opt/nitrovault/enclave.eif"}))
    with pytest.raises(ConfigError, match="unknown parent config key"):
        ParentConfig.load(path)


def test_asg_spans_three_azs_with_elb_health_checks(synth: Synth) -> None:
    (asg,) = synth.of_type("AWS::AutoScaling::AutoScalingGroup").values()
    props = asg["Properties"]
    assert len(props["VPCZoneIdentifier"]) == 3
    assert props["HealthCheckType"] == "ELB"
    assert int(props["MinSize"]) >= 2
    isolated = {
        k
        for k, r in synth.of_type("AWS::EC2::Subnet").items()
        if {"Key": "aws-cdk:subnet-type", "Value": "Isolated"} in r["Properties"]["Tags"]
    }
    assert {ref["Ref"] for ref in props["VPCZoneIdentifier"]} == isolated


def test_nlb_passes_tls_through_as_tcp_without_a_certificate(synth: Synth) -> None:
    synth.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer", {"Type": "network", "Scheme": "internal"}
    )
    synth.template.resource_count_is("AWS::ElasticLoadBalancingV2::Listener", 1)
    synth.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {
            "Protocol": "TCP",
            "Port": 443,
            "Certificates": Match.absent(),
            "SslPolicy": Match.absent(),
            "AlpnPolicy": Match.absent(),
            "DefaultActions": [Match.object_like({"Type": "forward"})],
        },
    )
    # nothing on the load balancer side can hold a key: no certificate of any kind in the stack
    synth.template.resource_count_is("AWS::ElasticLoadBalancingV2::ListenerCertificate", 0)
    synth.template.resource_count_is("AWS::CertificateManager::Certificate", 0)
    assert "arn:aws:acm:" not in json.dumps(synth.template.to_json())


def test_target_group_forwards_tcp_and_health_checks_the_parents_http_endpoint(synth: Synth) -> None:
    synth.template.resource_count_is("AWS::ElasticLoadBalancingV2::TargetGroup", 1)
    synth.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "Protocol": "TCP",
            "Port": 50051,
            "TargetType": "instance",
            "HealthCheckProtocol": "HTTP",
            "HealthCheckPort": "8080",
            "HealthCheckPath": "/health",
            "Matcher": {"HttpCode": "200"},
            "HealthCheckIntervalSeconds": 10,
            "HealthCheckTimeoutSeconds": 5,
            "HealthyThresholdCount": 3,
            "UnhealthyThresholdCount": 2,
            "TargetGroupAttributes": Match.array_with(
                [{"Key": "preserve_client_ip.enabled", "Value": "true"}]
            ),
        },
    )


def _security_group(synth: Synth, description: str) -> str:
    found = [
        k
        for k, r in synth.of_type("AWS::EC2::SecurityGroup").items()
        if description in r["Properties"]["GroupDescription"]
    ]
    assert len(found) == 1, found
    return found[0]


def _rules(synth: Synth, kind: str, group: str, inline: str) -> set[tuple[Any, ...]]:
    """Every (protocol, from, to, peer) of ``group``'s ingress or egress, inline or separate."""
    peer_keys = ("CidrIp", "SourceSecurityGroupId", "DestinationSecurityGroupId")

    def as_tuple(rule: dict[str, Any]) -> tuple[Any, ...]:
        (peer,) = [json.dumps(rule[k], sort_keys=True) for k in peer_keys if k in rule]
        return (rule["IpProtocol"], rule.get("FromPort"), rule.get("ToPort"), peer)

    rules = {as_tuple(r) for r in synth.resources[group]["Properties"].get(inline, [])}
    rules |= {
        as_tuple(r["Properties"])
        for r in synth.of_type(kind).values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [group, "GroupId"]}
    }
    return rules


def test_only_the_load_balancer_reaches_the_relay_and_health_ports(synth: Synth) -> None:
    host = _security_group(synth, "enclave hosts")
    lb = _security_group(synth, "load balancer")
    lb_ref = json.dumps({"Fn::GetAtt": [lb, "GroupId"]}, sort_keys=True)
    host_ref = json.dumps({"Fn::GetAtt": [host, "GroupId"]}, sort_keys=True)
    for port in (50051, 8080):
        synth.template.has_resource_properties(
            "AWS::EC2::SecurityGroupIngress",
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "GroupId": {"Fn::GetAtt": [host, "GroupId"]},
                "SourceSecurityGroupId": {"Fn::GetAtt": [lb, "GroupId"]},
            },
        )
    # the hosts accept those two ports from the load balancer and nothing else
    assert _rules(synth, "AWS::EC2::SecurityGroupIngress", host, "SecurityGroupIngress") == {
        ("tcp", 50051, 50051, lb_ref),
        ("tcp", 8080, 8080, lb_ref),
    }
    # the load balancer may send only there, and accepts only the client CIDR (default: the VPC) on 443
    assert _rules(synth, "AWS::EC2::SecurityGroupEgress", lb, "SecurityGroupEgress") == {
        ("tcp", 50051, 50051, host_ref),
        ("tcp", 8080, 8080, host_ref),
    }
    assert _rules(synth, "AWS::EC2::SecurityGroupIngress", lb, "SecurityGroupIngress") == {
        ("tcp", 443, 443, json.dumps(synth.stack.network.cidr)),
    }


def test_client_cidr_restricts_the_listener(tmp_path: Path) -> None:
    from aws_cdk.assertions import Template
    from synth_context import BASE_CONTEXT

    from infra.app import build_app

    _, stack = build_app({**BASE_CONTEXT, "clientCidr": "10.99.0.0/24", "nag": "false"})
    Template.from_stack(stack).has_resource_properties(
        "AWS::EC2::SecurityGroup",
        {
            "GroupDescription": Match.string_like_regexp("load balancer"),
            "SecurityGroupIngress": [
                Match.object_like({"CidrIp": "10.99.0.0/24", "FromPort": 443, "ToPort": 443})
            ],
        },
    )


# -- network ----------------------------------------------------------------------------------------------


def test_vpc_endpoints_and_no_nat(synth: Synth) -> None:
    services = []
    for endpoint in synth.of_type("AWS::EC2::VPCEndpoint").values():
        name = render_text(endpoint["Properties"]["ServiceName"])
        services.append((name.rsplit(".", 1)[-1], endpoint["Properties"].get("VpcEndpointType")))
    assert sorted(services) == sorted(
        [
            ("kms", "Interface"),
            ("ssm", "Interface"),
            ("ssmmessages", "Interface"),
            ("ec2messages", "Interface"),
            ("logs", "Interface"),
            ("autoscaling", "Interface"),  # the lifecycle watcher's (tests/infra/test_drain_stack.py)
            ("s3", "Gateway"),
        ]
    )
    synth.template.resource_count_is("AWS::EC2::NatGateway", 0)
    synth.template.resource_count_is("AWS::EC2::InternetGateway", 0)
    synth.template.resource_count_is("AWS::EC2::FlowLog", 1)


# -- observability ----------------------------------------------------------------------------------------


def test_every_log_group_is_encrypted_with_retention(synth: Synth) -> None:
    groups = synth.of_type("AWS::Logs::LogGroup")
    names = {g["Properties"]["LogGroupName"] for g in groups.values()}
    assert {"/nitrovault/parent", "/nitrovault/enclave", "/nitrovault/identity-canary"} <= names
    for group in groups.values():
        assert "KmsKeyId" in group["Properties"]
        assert group["Properties"]["RetentionInDays"] == 365


def test_alarms_on_restarts_key_release_failures_and_canary(synth: Synth) -> None:
    # restarts from the parent's metrics (tests/infra/test_metrics_alarms.py), key release from its log
    synth.template.has_resource_properties(
        "AWS::Logs::MetricFilter",
        {
            "MetricTransformations": [
                Match.object_like({"MetricNamespace": "nitrovault", "MetricName": "KeyReleaseFailures"})
            ]
        },
    )
    for metric in ("nitrovault_parent_enclave_restarts_total", "KeyReleaseFailures"):
        synth.template.has_resource_properties(
            "AWS::CloudWatch::Alarm",
            {"Namespace": "nitrovault", "MetricName": metric, "AlarmActions": [Match.any_value()]},
        )
    synth.template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": "nitrovault",
            "MetricName": "CanaryDecryptSucceeded",
            "Threshold": 1,
            "TreatMissingData": "breaching",
            "AlarmActions": [Match.any_value()],
        },
    )
    synth.template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})


# -- identity canary --------------------------------------------------------------------------------------


def test_canary_is_scheduled_and_allowed_by_iam(synth: Synth) -> None:
    function_id = _logical_id(synth, "AWS::Lambda::Function", Handler="handler.handler")
    synth.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "ScheduleExpression": "rate(1 hour)",
            "State": "ENABLED",
            "Targets": [Match.object_like({"Arn": {"Fn::GetAtt": [function_id, "Arn"]}})],
        },
    )
    function = synth.resources[function_id]["Properties"]
    env = function["Environment"]["Variables"]
    assert json.loads(env["CANARY_ENCRYPTION_CONTEXT"]) == CONTEXT
    model_key_id = _model_key_id(synth)
    assert env["MODEL_KEY_ARN"] == {"Fn::GetAtt": [model_key_id, "Arn"]}
    synth.template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Action": "kms:Decrypt",
                                "Effect": "Allow",
                                "Resource": {"Fn::GetAtt": [model_key_id, "Arn"]},
                            }
                        )
                    ]
                ),
                "Version": Match.any_value(),
            }
        },
    )


def test_canary_asset_holds_only_the_handler(synth: Synth) -> None:
    assets = [p for p in synth.outdir.glob("asset.*") if (p / "handler.py").exists()]
    assert len(assets) == 1
    assert sorted(p.name for p in assets[0].iterdir()) == ["handler.py"]


# -- cdk-nag and cfn-lint ---------------------------------------------------------------------------------


def test_cdk_nag_has_zero_unsuppressed_findings(synth: Synth) -> None:
    annotations = Annotations.from_stack(synth.stack)
    assert annotations.find_error("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    assert annotations.find_warning("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    report = next(synth.outdir.glob("AwsSolutions-*NagReport.csv")).read_text()
    assert "Non-Compliant" not in report and '"UNKNOWN"' not in report
    assert report.count('"Compliant"') > 20  # the checks did run


def test_every_suppression_states_a_reason(synth: Synth) -> None:
    from infra.nag import SUPPRESSIONS

    for _path, rule, reason, _applies in SUPPRESSIONS:
        assert rule.startswith("AwsSolutions-") and len(reason) >= 40
    suppressed = [
        r["Metadata"]["cdk_nag"]["rules_to_suppress"]
        for r in synth.resources.values()
        if "cdk_nag" in r.get("Metadata", {})
    ]
    assert len([s for rules in suppressed for s in rules]) >= len(SUPPRESSIONS)
    assert all(s["reason"] for rules in suppressed for s in rules)


def test_cdk_nag_does_report_a_non_compliant_resource() -> None:
    # Negative control: the collection above would see a finding if there were one.
    from aws_cdk import App, Aspects, Stack
    from aws_cdk import aws_s3 as s3
    from cdk_nag import AwsSolutionsChecks

    app = App()
    stack = Stack(app, "Bad")
    s3.Bucket(stack, "Plain")
    Aspects.of(app).add(AwsSolutionsChecks())
    errors = Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*"))
    assert any("AwsSolutions-S1" in json.dumps(e.entry.data) for e in errors)


def _cfn_lint(*paths: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [str(CFN_LINT), "--format", "parseable", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_cfn_lint_has_zero_errors_on_every_template(synth: Synth) -> None:
    templates = sorted(synth.outdir.glob("*.template.json"))
    assert templates
    code, out = _cfn_lint(*templates)
    errors = [line for line in out.splitlines() if ":E" in line]
    assert errors == [] and not code & 2, out


def test_cfn_lint_reports_a_broken_template(tmp_path: Path) -> None:
    bad = tmp_path / "bad.template.json"
    bad.write_text(json.dumps({"Resources": {"B": {"Type": "AWS::S3::Bucket", "Properties": {"Nope": 1}}}}))
    code, out = _cfn_lint(bad)
    assert code & 2 and ":E" in out


# -- app entry ---------------------------------------------------------------------------------------------


def test_unsafe_flag_lets_debug_pcrs_through_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from synth_context import BASE_CONTEXT

    from infra.app import build_app

    manifest = tmp_path / "debug.json"
    manifest.write_text(json.dumps({"pcrs": {str(i): "00" * 48 for i in (0, 1, 2)}}))
    with caplog.at_level("WARNING"):
        _, stack = build_app(
            {**BASE_CONTEXT, "pcrManifest": str(manifest), "unsafeAllowDebugPcrs": "true", "nag": "false"}
        )
    release = stack.model_key.policy["Statement"][2]
    assert release["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:PCR0"] == "00" * 48
    assert sum("UNSAFE" in r.getMessage() for r in caplog.records) >= 2  # manifest reader and builder


def test_canary_ciphertext_context_reaches_the_function(synth: Synth) -> None:
    from synth_context import BASE_CONTEXT

    from infra.app import props_from_context

    blob = base64.b64encode(b"ciphertext").decode()
    assert (
        props_from_context({**BASE_CONTEXT, "canaryCiphertext": blob}, env={}).canary_ciphertext_b64 == blob
    )
