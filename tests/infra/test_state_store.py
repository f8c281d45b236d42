"""The shared state store and the audit alarms, on the synthesized stack (one synth per session, see
conftest): ElastiCache for Valkey with TLS required and at-rest encryption, reachable on 6379 only from
the enclave hosts, RBAC with a disabled default user, passwords no role but the owner may read (and the
enclave host role explicitly may not), no IAM authentication anywhere; the hosts' second vsock-proxy on
vsock port 8002; the AuditGaps metric filter and alarm (AuditWithheld reads the parent's metrics now:
tests/infra/test_metrics_alarms.py). cdk-nag and cfn-lint run on this same synth in test_stack.py."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template
from synth_context import ACCOUNT, BASE_CONTEXT, Synth

from infra.constructs.state_store import DEFAULT_USER_ACCESS_STRING, ENCLAVE_ACCESS_STRING
from nitrovault.errors import ConfigError
from nitrovault.policy.cfn import render_text

ROLE = f"arn:aws:iam::{ACCOUNT}:role/"
HOST_ROLE = f"{ROLE}nitrovault-enclave-host"
SEALER = f"{ROLE}nitrovault-sealer"
FORBIDDEN = ("secretsmanager:GetSecretValue", "elasticache:Connect")


def _one(s: Synth, kind: str) -> tuple[str, dict[str, Any]]:
    found = list(s.of_type(kind).items())
    assert len(found) == 1, found
    return found[0]


def _user_data(s: Synth) -> str:
    (template,) = s.of_type("AWS::EC2::LaunchTemplate").values()
    return render_text(template["Properties"]["LaunchTemplateData"]["UserData"])


def _endpoint(s: Synth) -> str:
    rg_id, _ = _one(s, "AWS::ElastiCache::ReplicationGroup")
    return f"<GetAtt:{rg_id}.PrimaryEndPoint.Address>"


def _role_id(s: Synth, name: str) -> str:
    (found,) = [k for k, r in s.of_type("AWS::IAM::Role").items() if r["Properties"].get("RoleName") == name]
    return found


def _secret_id(s: Synth, name: str) -> str:
    (found,) = [
        k for k, r in s.of_type("AWS::SecretsManager::Secret").items() if r["Properties"]["Name"] == name
    ]
    return found


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# -- the replication group ---------------------------------------------------------------------------------


def test_replication_group_is_valkey_tls_required_encrypted_multi_az(synth: Synth) -> None:
    _, rg = _one(synth, "AWS::ElastiCache::ReplicationGroup")
    props = rg["Properties"]
    assert props["Engine"] == "valkey" and props["EngineVersion"] == "7.2"
    groups = synth.template.find_resources("AWS::ElastiCache::ParameterGroup")
    (group,) = groups.values()  # eviction would silently reset limits: a full store must refuse writes
    assert group["Properties"]["Properties"] == {"maxmemory-policy": "noeviction"}
    assert group["Properties"]["CacheParameterGroupFamily"] == "valkey7"
    assert props["CacheParameterGroupName"] == {"Ref": next(iter(groups))}
    assert props["TransitEncryptionEnabled"] is True and props["TransitEncryptionMode"] == "required"
    assert props["AtRestEncryptionEnabled"] is True
    # the AWS managed key (the state_store module docstring says why no key of this app): the stack's
    # keys stay the four reviewed ones (test_at_rest_keys.py)
    assert "KmsKeyId" not in props
    assert props["MultiAZEnabled"] is True and props["AutomaticFailoverEnabled"] is True
    assert props["NumCacheClusters"] == 2 and props["Port"] == 6379
    assert props["SnapshotRetentionLimit"] == 0  # no snapshot to roll budgets back to
    assert "AuthToken" not in props  # RBAC, below


def test_replication_group_lives_in_the_isolated_host_subnets(synth: Synth) -> None:
    _, rg = _one(synth, "AWS::ElastiCache::ReplicationGroup")
    group_id, group = _one(synth, "AWS::ElastiCache::SubnetGroup")
    assert rg["Properties"]["CacheSubnetGroupName"] == {"Ref": group_id}
    isolated = {
        k
        for k, r in synth.of_type("AWS::EC2::Subnet").items()
        if {"Key": "aws-cdk:subnet-type", "Value": "Isolated"} in r["Properties"]["Tags"]
    }
    assert {ref["Ref"] for ref in group["Properties"]["SubnetIds"]} == isolated and len(isolated) == 3


def _security_group(s: Synth, description: str) -> str:
    (found,) = [
        k
        for k, r in s.of_type("AWS::EC2::SecurityGroup").items()
        if description in r["Properties"]["GroupDescription"]
    ]
    return found


def test_only_the_enclave_hosts_reach_6379(synth: Synth) -> None:
    store = _security_group(synth, "state store")
    host = _security_group(synth, "enclave hosts")
    _, rg = _one(synth, "AWS::ElastiCache::ReplicationGroup")
    assert rg["Properties"]["SecurityGroupIds"] == [{"Fn::GetAtt": [store, "GroupId"]}]
    store_sg = synth.resources[store]["Properties"]
    assert "SecurityGroupIngress" not in store_sg
    ingress = [
        r["Properties"]
        for r in synth.of_type("AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [store, "GroupId"]}
    ]
    assert [
        (i["IpProtocol"], i["FromPort"], i["ToPort"], i.get("SourceSecurityGroupId")) for i in ingress
    ] == [("tcp", 6379, 6379, {"Fn::GetAtt": [host, "GroupId"]})]
    assert all("CidrIp" not in i and "CidrIpv6" not in i for i in ingress)
    # no egress: CDK's "disallow all" placeholder rule only
    (egress,) = store_sg["SecurityGroupEgress"]
    assert egress["CidrIp"] == "255.255.255.255/32" and egress["Description"] == "Disallow all traffic"


# -- RBAC -------------------------------------------------------------------------------------------------


def test_user_group_holds_the_enclave_user_and_a_disabled_default_user(synth: Synth) -> None:
    group_id, group = _one(synth, "AWS::ElastiCache::UserGroup")
    _, rg = _one(synth, "AWS::ElastiCache::ReplicationGroup")
    assert rg["Properties"]["UserGroupIds"] == [{"Ref": group_id}]
    assert group["Properties"]["Engine"] == "valkey"
    users = {u["Properties"]["UserId"]: u for u in synth.of_type("AWS::ElastiCache::User").values()}
    assert sorted(group["Properties"]["UserIds"]) == sorted(users) and len(users) == 2
    by_name = {u["Properties"]["UserName"]: u["Properties"] for u in users.values()}
    assert set(by_name) == {"default", "nitrovault-enclave"}
    default = by_name["default"]
    assert default["UserId"] != "default"  # a replacement default user
    assert (
        default["AccessString"] == DEFAULT_USER_ACCESS_STRING and default["AccessString"].split()[0] == "off"
    )
    enclave = by_name["nitrovault-enclave"]
    assert enclave["AccessString"] == ENCLAVE_ACCESS_STRING
    words = ENCLAVE_ACCESS_STRING.split()
    assert words[:3] == ["on", "~nv:*", "-@all"] and not any(w.startswith("~") for w in words[2:])
    assert "allkeys" not in words and "~*" not in words and "+@all" not in words
    for name, user in by_name.items():
        assert user["Engine"] == "valkey"
        assert "NoPasswordRequired" not in user and "nopass" not in user["AccessString"], name
        assert user["AuthenticationMode"]["Type"] == "password", name


def test_passwords_are_dynamic_references_to_the_generated_secrets(synth: Synth) -> None:
    secrets = {
        r["Properties"]["Name"]: (k, r["Properties"])
        for k, r in synth.of_type("AWS::SecretsManager::Secret").items()
    }
    assert set(secrets) == {
        "nitrovault/state-store/nitrovault-enclave",
        "nitrovault/state-store/default-user",
    }
    for _, props in secrets.values():
        generated = props["GenerateSecretString"]
        assert generated["GenerateStringKey"] == "password" and generated["PasswordLength"] >= 32
        assert "SecretString" not in props
    by_name = {
        u["Properties"]["UserName"]: u["Properties"] for u in synth.of_type("AWS::ElastiCache::User").values()
    }
    for user_name, secret_name in (
        ("nitrovault-enclave", "nitrovault/state-store/nitrovault-enclave"),
        ("default", "nitrovault/state-store/default-user"),
    ):
        (password,) = by_name[user_name]["AuthenticationMode"]["Passwords"]
        secret_id = secrets[secret_name][0]
        expected = f"{{{{resolve:secretsmanager:<Ref:{secret_id}>:SecretString:password::}}}}"
        assert render_text(password) == expected


# -- nobody but the owner reads the passwords; nobody uses IAM auth ---------------------------------------


def _allow_statements(s: Synth) -> list[tuple[set[str], dict[str, Any]]]:
    """(role logical ids, statement) for every Allow in every identity policy of the template."""
    found: list[tuple[set[str], dict[str, Any]]] = []
    for kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in s.of_type(kind).values():
            roles = {r["Ref"] for r in policy["Properties"].get("Roles", [])}
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Allow":
                    found.append((roles, statement))
    for logical, role in s.of_type("AWS::IAM::Role").items():
        for inline in role["Properties"].get("Policies", []):
            for statement in inline["PolicyDocument"]["Statement"]:
                if statement["Effect"] == "Allow":
                    found.append(({logical}, statement))
    return found


def _grants(statement: dict[str, Any], action: str) -> bool:
    actions = _as_list(statement.get("Action", []))
    return any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions)


def test_no_role_but_the_sealer_may_read_a_password_and_none_may_connect_with_iam(synth: Synth) -> None:
    sealer = _role_id(synth, "nitrovault-sealer")
    host = _role_id(synth, "nitrovault-enclave-host")
    enclave_secret = _secret_id(synth, "nitrovault/state-store/nitrovault-enclave")
    statements = _allow_statements(synth)
    assert statements  # the walk found the app's policies
    for roles, statement in statements:
        assert not _grants(statement, "elasticache:Connect"), statement
        if _grants(statement, "secretsmanager:GetSecretValue"):
            assert roles == {sealer}, (roles, statement)
            assert _as_list(statement["Resource"]) == [{"Ref": enclave_secret}]
        if host in roles:
            assert not any(_grants(statement, a) for a in FORBIDDEN), statement
    # no role has a managed policy that could hand out either (only AWS's SSM and Lambda basics)
    for role in synth.of_type("AWS::IAM::Role").values():
        for arn in role["Properties"].get("ManagedPolicyArns", []):
            text = arn["Fn::Sub"] if isinstance(arn, dict) and "Fn::Sub" in arn else render_text(arn)
            assert text.rsplit("/", 1)[-1] in {
                "AmazonSSMManagedInstanceCore",
                "AWSLambdaBasicExecutionRole",
            }, arn


def test_the_host_role_is_explicitly_denied_the_passwords(synth: Synth) -> None:
    host = _role_id(synth, "nitrovault-enclave-host")
    secret_ids = {
        _secret_id(synth, n)
        for n in ("nitrovault/state-store/nitrovault-enclave", "nitrovault/state-store/default-user")
    }
    denies = [
        s
        for p in synth.of_type("AWS::IAM::Policy").values()
        if {"Ref": host} in p["Properties"].get("Roles", [])
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Deny"
    ]
    assert len(denies) == 1
    assert denies[0]["Action"] == "secretsmanager:GetSecretValue"
    assert {r["Ref"] for r in denies[0]["Resource"]} == secret_ids
    # and in each secret's own resource policy, independent of any IAM policy
    policies = {
        r["Properties"]["SecretId"]["Ref"]: r
        for r in synth.of_type("AWS::SecretsManager::ResourcePolicy").values()
    }
    assert set(policies) == secret_ids
    for secret_id, policy in policies.items():
        statements = {s["Sid"]: s for s in policy["Properties"]["ResourcePolicy"]["Statement"]}
        assert set(statements) == {"DenyEnclaveHosts", "DenyEveryoneButTheReaders"}
        named = statements["DenyEnclaveHosts"]
        assert named["Effect"] == "Deny" and named["Principal"] == {"AWS": HOST_ROLE}
        assert named["Action"] == "secretsmanager:GetSecretValue"
        others = statements["DenyEveryoneButTheReaders"]
        assert others["Effect"] == "Deny" and others["Principal"] == {"AWS": "*"}
        readers = _as_list(others["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])
        assert HOST_ROLE not in readers
        assert (SEALER in readers) == (
            secret_id == _secret_id(synth, "nitrovault/state-store/nitrovault-enclave")
        )
        assert all(r == SEALER or ":role/cdk-hnb659fds-cfn-exec-role-" in r for r in readers)
        # the policy names the host role by ARN, so it waits for the role
        assert host in policy["DependsOn"]


# -- the hosts' second vsock-proxy ------------------------------------------------------------------------


def test_user_data_runs_a_second_vsock_proxy_on_8002_to_the_store(synth: Synth) -> None:
    script = _user_data(synth)
    endpoint = _endpoint(synth)
    exec_start = (
        f"ExecStart=/usr/bin/vsock-proxy 8002 {endpoint} 6379 --config /etc/nitro_enclaves/vsock-proxy.yaml"
    )
    head = "cat > /etc/systemd/system/vsock-proxy-state-store.service <<'NITROVAULT_EOF'\n"
    assert script.count(head) == 1
    unit = script.split(head, 1)[1].split("\nNITROVAULT_EOF", 1)[0]
    assert exec_start in unit.splitlines()
    assert "systemctl enable --now vsock-proxy-state-store.service" in script
    allowlist = script.split("cat > /etc/nitro_enclaves/vsock-proxy.yaml <<'NITROVAULT_EOF'\n", 1)[1]
    assert allowlist.split("\nNITROVAULT_EOF", 1)[0].splitlines() == [
        "allowlist:",
        "- {address: kms.us-east-1.amazonaws.com, port: 443}",
        f"- {{address: {endpoint}, port: 6379}}",
    ]
    # the endpoint CloudFormation fills in is checked on the host before any file is written
    check = script.index(
        f"printf '%s\\n' '{endpoint}' | grep -Eqx '[a-z0-9.-]+\\.cache\\.amazonaws\\.com(\\.cn)?'"
    )
    assert script.index("set -euo pipefail") < check < script.index("cat > ")
    # the placeholder used while rendering never reaches the instance
    assert "placeholder" not in script


def test_store_endpoint_port_and_secret_are_outputs(synth: Synth) -> None:
    outputs = synth.template.to_json()["Outputs"]
    rg_id, _ = _one(synth, "AWS::ElastiCache::ReplicationGroup")
    assert outputs["StateStoreEndpointAddress"]["Value"] == {"Fn::GetAtt": [rg_id, "PrimaryEndPoint.Address"]}
    assert outputs["StateStoreEndpointPort"]["Value"] == {"Fn::GetAtt": [rg_id, "PrimaryEndPoint.Port"]}
    secret = _secret_id(synth, "nitrovault/state-store/nitrovault-enclave")
    assert outputs["StateStoreSecretArn"]["Value"] == {"Ref": secret}


def test_store_proxy_lines_validate_literal_hosts() -> None:
    from infra.constructs.enclave_host import store_proxy_lines

    host = "master.nv.abc123.use1.cache.amazonaws.com"
    allowlist, check, unit = store_proxy_lines("us-east-1", host, 6379)
    assert allowlist.endswith(f"- {{address: {host}, port: 6379}}\n")
    assert f"'{host}'" in check[0]
    assert (
        f"ExecStart=/usr/bin/vsock-proxy 8002 {host} 6379 --config /etc/nitro_enclaves/vsock-proxy.yaml"
        in unit[1]
    )
    for bad in ("*.cache.amazonaws.com", "evil.example.com", f"{host}\nExecStart=/bin/sh", f"{host}'"):
        with pytest.raises(ConfigError):
            store_proxy_lines("us-east-1", bad, 6379)
    with pytest.raises(ConfigError):
        store_proxy_lines("us-east-1", host, 0)


def test_the_linted_template_holds_the_store(synth: Synth) -> None:
    # test_stack.py's cfn-lint test lints every *.template.json of this synth: the store is in it
    (template,) = sorted(synth.outdir.glob("Nitrovault.template.json"))
    resources = json.loads(template.read_text())["Resources"]
    kinds = {r["Type"] for r in resources.values()}
    assert {
        "AWS::ElastiCache::ReplicationGroup",
        "AWS::ElastiCache::SubnetGroup",
        "AWS::ElastiCache::User",
        "AWS::ElastiCache::UserGroup",
        "AWS::SecretsManager::Secret",
        "AWS::SecretsManager::ResourcePolicy",
    } <= kinds


# -- without the store ------------------------------------------------------------------------------------


def test_state_store_off_leaves_no_store_and_a_kms_only_allowlist(tmp_path: Path) -> None:
    from aws_cdk.assertions import Annotations

    from infra.app import build_app

    app, stack = build_app({**BASE_CONTEXT, "stateStore": "false"}, outdir=str(tmp_path))
    assert stack.state_store is None
    app.synth()  # nag on: the store's suppressions are skipped, not an error
    template = Template.from_stack(stack)
    for kind in ("ReplicationGroup", "User", "UserGroup", "SubnetGroup"):
        template.resource_count_is(f"AWS::ElastiCache::{kind}", 0)
    template.resource_count_is("AWS::SecretsManager::Secret", 0)
    assert Annotations.from_stack(stack).find_error("*", Match.string_like_regexp("AwsSolutions-.*")) == []
    (lt,) = template.find_resources("AWS::EC2::LaunchTemplate").values()
    script = render_text(lt["Properties"]["LaunchTemplateData"]["UserData"])
    assert "vsock-proxy-state-store" not in script and " 8002 " not in script
    allowlist = script.split("cat > /etc/nitro_enclaves/vsock-proxy.yaml <<'NITROVAULT_EOF'\n", 1)[1]
    assert (
        allowlist.split("\nNITROVAULT_EOF", 1)[0]
        == "allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}"
    )
    assert not any(k.startswith("StateStore") for k in template.to_json()["Outputs"])


def test_state_store_context_flag() -> None:
    from infra.app import props_from_context

    assert props_from_context(BASE_CONTEXT, env={}).state_store is True
    assert props_from_context({**BASE_CONTEXT, "stateStore": "false"}, env={}).state_store is False
    with pytest.raises(ConfigError, match="stateStore"):
        props_from_context({**BASE_CONTEXT, "stateStore": "maybe"}, env={})


# -- audit alarms -----------------------------------------------------------------------------------------


def _log_group_id(s: Synth, name: str) -> str:
    (found,) = [
        k for k, r in s.of_type("AWS::Logs::LogGroup").items() if r["Properties"]["LogGroupName"] == name
    ]
    return found


@pytest.mark.parametrize(
    ("metric", "pattern", "group"),
    [
        ("AuditGaps", '{ $.kind = "gap" }', "/nitrovault/enclave"),
    ],
)
def test_audit_metric_filters_and_alarms(synth: Synth, metric: str, pattern: str, group: str) -> None:
    filters = [
        f["Properties"]
        for f in synth.of_type("AWS::Logs::MetricFilter").values()
        if f["Properties"]["MetricTransformations"][0]["MetricName"] == metric
    ]
    assert len(filters) == 1
    assert filters[0]["FilterPattern"] == pattern
    assert filters[0]["LogGroupName"] == {"Ref": _log_group_id(synth, group)}
    assert filters[0]["MetricTransformations"] == [
        {"MetricNamespace": "nitrovault", "MetricName": metric, "MetricValue": "1"}
    ]
    (topic,) = synth.of_type("AWS::SNS::Topic")
    synth.template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "Namespace": "nitrovault",
            "MetricName": metric,
            "Statistic": "Sum",
            "Period": 300,
            "EvaluationPeriods": 1,
            "Threshold": 1,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "notBreaching",
            "AlarmActions": [{"Ref": topic}],
        },
    )


def test_gap_entries_and_the_withheld_line_have_the_fields_the_filters_read(
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    import asyncio

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from nitrovault.audit import AuditWriter
    from nitrovault.rpc.gen.nitrovault.v1 import host_pb2
    from parent_app.host_services import AUDIT_WITHHELD, HostServices
    from parent_app.host_sources import DirectoryModels, StaticCredentials

    lines: list[bytes] = []
    down = [True]

    def sink(line: bytes) -> None:
        if down[0]:
            raise OSError("the parent stopped storing")
        lines.append(line)

    writer = AuditWriter(ed25519.Ed25519PrivateKey.generate(), sink=sink, max_buffered=1)
    for i in range(4):  # the sink is down and the buffer holds one entry: records are dropped
        writer.append({"method": "Predict", "n": i})
    down[0] = False
    writer.close()
    kinds = [json.loads(line)["kind"] for line in b"".join(lines).splitlines()]
    assert "gap" in kinds  # {"kind": "gap", ...}: what { $.kind = "gap" } matches
    # the enclave's report (enclave_app.main: step "audit-withheld") as the parent logs it
    host = HostServices(credentials=StaticCredentials(tmp_path / "none.json"),
                        models=DirectoryModels(tmp_path), region="us-east-1")
    report = host_pb2.StatusReport(state=host_pb2.StatusReport.State.Value("DEGRADED"), step=AUDIT_WITHHELD,
                                   reason="7 audit entries not stored by the parent (bound 6)")
    with caplog.at_level("WARNING"):
        asyncio.run(host.ReportStatus(report, None))  # type: ignore[arg-type]
    assert any("audit-withheld" in r.getMessage() for r in caplog.records)  # what "audit-withheld" matches
