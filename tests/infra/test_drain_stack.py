"""Graceful drain in the CDK app (docs/deploy.md, "Draining an instance"), on the session's synth.

The termination lifecycle hook carries the watcher's hook name and a heartbeat above the watcher's poll,
the parent's stop and the wait for the log agent; the parent's unit stops with SIGTERM (to the parent
only) and a ``TimeoutStopSec`` above ``drain_timeout_s`` + ``AUDIT_FLUSH_S``, both derived from the
parent config the stack writes; the watcher's unit runs ``python -m parent_app.lifecycle`` with arguments
it parses, does not ``Requires=`` the parent, and restarts only on failure; the host role may call
exactly the two Auto Scaling actions, ``CompleteLifecycleAction`` on this group only, from a policy of its
own (in the role's default policy it would be a dependency cycle: the negative control shows cfn-lint
catching exactly that); the hosts reach Auto Scaling through an endpoint only their security group may use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from synth_context import ACCOUNT, REGION, Synth, heredoc

from infra.constructs.enclave_host import (
    HOOK_MARGIN_S,
    LIFECYCLE_UNIT,
    PARENT_CONFIG_PATH,
    PARENT_LOG,
    PARENT_UNIT,
    STOP_MARGIN_S,
    drain_bounds,
    systemd_unit,
)
from nitrovault.policy.cfn import render_text
from parent_app.config import ParentConfig
from parent_app.lifecycle import HOOK_NAME, LOG_SHIP_WAIT_S, POLL_INTERVAL_S, parse_args
from parent_app.main import AUDIT_FLUSH_S

CFN_LINT = Path(sys.executable).with_name("cfn-lint")


def _user_data(s: Synth) -> str:
    return s.user_data()


_file = heredoc


def _unit(s: Synth, name: str) -> dict[str, list[str]]:
    """A unit's ``Key=value`` lines, by key (keys may repeat)."""
    lines: dict[str, list[str]] = {}
    for line in _file(_user_data(s), f"/etc/systemd/system/{name}").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            lines.setdefault(key, []).append(value)
    return lines


def _parent_config(s: Synth, tmp_path: Path) -> ParentConfig:
    path = tmp_path / "parent.json"
    path.write_text(_file(_user_data(s), PARENT_CONFIG_PATH))
    return ParentConfig.load(path)


def _asg_id(s: Synth) -> str:
    (asg,) = s.of_type("AWS::AutoScaling::AutoScalingGroup")
    return str(asg)


def _hook(s: Synth) -> dict[str, Any]:
    (hook,) = s.of_type("AWS::AutoScaling::LifecycleHook").values()
    return dict(hook["Properties"])


# -- the bounds ----------------------------------------------------------------------------------------------


def test_the_parent_unit_stops_with_sigterm_past_the_drain_bound(synth: Synth, tmp_path: Path) -> None:
    config = _parent_config(synth, tmp_path)
    unit = _unit(synth, PARENT_UNIT)
    assert unit["KillSignal"] == ["SIGTERM"] and unit["KillMode"] == ["mixed"]
    (stop,) = map(int, unit["TimeoutStopSec"])
    stop_bound, _ = drain_bounds(config.drain_timeout_s)
    assert stop == stop_bound >= config.drain_timeout_s + AUDIT_FLUSH_S + STOP_MARGIN_S
    assert config.drain_timeout_s == 30.0  # written explicitly, so the bound is derived from what runs


def test_the_hook_outlasts_the_watchers_poll_the_stop_and_the_log_agent(synth: Synth, tmp_path: Path) -> None:
    config = _parent_config(synth, tmp_path)
    hook = _hook(synth)
    assert hook["LifecycleHookName"] == HOOK_NAME
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["DefaultResult"] == "CONTINUE"  # a watcher that never answers still lets the group go on
    assert hook["AutoScalingGroupName"] == {"Ref": _asg_id(synth)}
    assert "NotificationTargetARN" not in hook and "RoleARN" not in hook  # the instance polls IMDS
    (stop,) = map(int, _unit(synth, PARENT_UNIT)["TimeoutStopSec"])
    assert hook["HeartbeatTimeout"] == drain_bounds(config.drain_timeout_s)[1]
    assert hook["HeartbeatTimeout"] >= stop + POLL_INTERVAL_S + LOG_SHIP_WAIT_S + HOOK_MARGIN_S
    assert 30 <= hook["HeartbeatTimeout"] <= 7200  # what Auto Scaling accepts


def test_drain_bounds_grow_with_the_drain_timeout_and_refuse_nonsense() -> None:
    assert drain_bounds(30.0) == (60, 125)
    assert drain_bounds(120.0) == (150, 215)
    assert drain_bounds(0.5) == (31, 96)
    for bad in (0, -1.0, 3601.0, True):
        with pytest.raises(ValueError, match="drain_timeout_s"):
            drain_bounds(bad)


# -- the watcher's unit --------------------------------------------------------------------------------------


def test_the_watcher_runs_the_lifecycle_module_with_arguments_it_parses(synth: Synth) -> None:
    unit = _unit(synth, LIFECYCLE_UNIT)
    (exec_start,) = unit["ExecStart"]
    argv = exec_start.split()
    assert argv[:3] == ["/opt/nitrovault/venv/bin/python", "-m", "parent_app.lifecycle"]
    args = parse_args(argv[3:])
    (stop,) = map(int, _unit(synth, PARENT_UNIT)["TimeoutStopSec"])
    assert args.region == REGION and args.stop_timeout > stop  # systemctl returns within TimeoutStopSec
    assert unit["Restart"] == ["on-failure"]  # it exits 0 once done: never again on the same instance
    # stopping the parent must not stop the watcher: no Requires=/BindsTo=/PartOf= the parent
    for key in ("Requires", "BindsTo", "PartOf", "After"):
        assert not any(PARENT_UNIT in v for v in unit.get(key, []))
    assert unit["StandardError"] == [f"append:{PARENT_LOG}"]  # shipped with the parent's log


def test_the_argv_parser_refuses_a_unit_without_the_region() -> None:
    # Negative control for the parse above.
    with pytest.raises(SystemExit):
        parse_args(["--stop-timeout", "90"])


def test_the_boot_script_starts_the_watcher_after_the_parent(synth: Synth) -> None:
    script = _user_data(synth)
    assert script.index(f"systemctl enable --now {PARENT_UNIT}") < script.index(
        f"systemctl enable --now {LIFECYCLE_UNIT}"
    )


def test_systemd_unit_takes_only_known_restart_policies() -> None:
    unit = systemd_unit("x", ["/bin/true"], after=("a.service",), log_file="/l", stopping=("KillMode=mixed",))
    assert "Restart=always" in unit and "KillMode=mixed" in unit
    with pytest.raises(ValueError, match="Restart"):
        systemd_unit("x", ["/bin/true"], after=("a.service",), log_file="/l", restart="no; rm -rf /")


# -- IAM and the way to the API ------------------------------------------------------------------------------


def _host_role(s: Synth) -> str:
    (role,) = [
        k
        for k, r in s.of_type("AWS::IAM::Role").items()
        if r["Properties"].get("RoleName") == "nitrovault-enclave-host"
    ]
    return role


def _host_statements(s: Synth) -> list[tuple[str, dict[str, Any]]]:
    role = _host_role(s)
    return [
        (logical, statement)
        for logical, p in s.of_type("AWS::IAM::Policy").items()
        if {"Ref": role} in p["Properties"]["Roles"]
        for statement in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _actions(statement: dict[str, Any]) -> list[str]:
    actions = statement["Action"]
    return [actions] if isinstance(actions, str) else list(actions)


def test_the_host_role_may_call_exactly_the_watchers_two_actions(synth: Synth) -> None:
    autoscaling = [
        (lg, st)
        for lg, st in _host_statements(synth)
        if any(a.startswith("autoscaling:") for a in _actions(st))
    ]
    assert len({lg for lg, _ in autoscaling}) == 1  # one policy of its own
    by_action = {a: st for _, st in autoscaling for a in _actions(st)}
    assert set(by_action) == {
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:DescribeAutoScalingInstances",
    }
    assert all(st["Effect"] == "Allow" and "Condition" not in st for st in by_action.values())
    assert by_action["autoscaling:DescribeAutoScalingInstances"]["Resource"] == "*"  # no resource-level form
    assert by_action["autoscaling:CompleteLifecycleAction"]["Resource"] == {
        "Fn::Join": [
            "",
            [
                f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:*:autoScalingGroupName/",
                {"Ref": _asg_id(synth)},
            ],
        ]
    }
    # and not in the role's default policy (that would be the cycle below)
    default = [lg for lg, p in synth.of_type("AWS::IAM::Policy").items() if "InstanceRoleDefaultPolicy" in lg]
    assert default and not {lg for lg, _ in autoscaling} & set(default)


def test_the_drain_policys_nag_suppression_covers_only_its_two_wildcards(synth: Synth) -> None:
    (logical,) = {
        lg for lg, st in _host_statements(synth) if "autoscaling:DescribeAutoScalingInstances" in _actions(st)
    }
    (rule,) = synth.resources[logical]["Metadata"]["cdk_nag"]["rules_to_suppress"]
    assert rule["id"] == "AwsSolutions-IAM5" and len(rule["reason"]) >= 40
    assert rule["applies_to"][0] == "Resource::*" and len(rule["applies_to"]) == 2


def test_the_autoscaling_endpoint_admits_only_the_hosts(synth: Synth) -> None:
    (endpoint,) = [
        e["Properties"]
        for e in synth.of_type("AWS::EC2::VPCEndpoint").values()
        if render_text(e["Properties"]["ServiceName"]).endswith(".autoscaling")
    ]
    assert endpoint["VpcEndpointType"] == "Interface" and endpoint["PrivateDnsEnabled"] is True
    (sg,) = [g["Fn::GetAtt"][0] for g in endpoint["SecurityGroupIds"]]
    host_sg = next(
        k
        for k, r in synth.of_type("AWS::EC2::SecurityGroup").items()
        if r["Properties"]["GroupDescription"] == "nitrovault enclave hosts"
    )
    ingress = list(synth.resources[sg]["Properties"].get("SecurityGroupIngress", []))
    ingress += [
        r["Properties"]
        for r in synth.of_type("AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [sg, "GroupId"]}
    ]
    assert [
        (r["IpProtocol"], r["FromPort"], r["ToPort"], r.get("SourceSecurityGroupId")) for r in ingress
    ] == [("tcp", 443, 443, {"Fn::GetAtt": [host_sg, "GroupId"]})]
    subnets = {s["Ref"] for s in endpoint["SubnetIds"]}
    (asg,) = synth.of_type("AWS::AutoScaling::AutoScalingGroup").values()
    assert subnets == {s["Ref"] for s in asg["Properties"]["VPCZoneIdentifier"]}


def _cfn_lint_errors(template: Path) -> list[str]:
    proc = subprocess.run(
        [str(CFN_LINT), "--format", "parseable", str(template)], capture_output=True, text=True, timeout=120
    )
    return [line for line in proc.stdout.splitlines() if ":E" in line]


def test_the_stack_has_no_dependency_cycle(synth: Synth) -> None:
    (template,) = sorted(synth.outdir.glob("Nitrovault.template.json"))
    assert not [e for e in _cfn_lint_errors(template) if ":E3004:" in e]


def test_cfn_lint_catches_the_cycle_of_the_group_in_the_roles_default_policy(tmp_path: Path) -> None:
    # Negative control: the group's ARN in the launch template role's default policy is a cycle
    # (group -> launch template -> default policy -> group), and cfn-lint reports it.
    from aws_cdk import App, Stack
    from aws_cdk import aws_autoscaling as autoscaling
    from aws_cdk import aws_ec2 as ec2
    from aws_cdk import aws_iam as iam

    app = App(outdir=str(tmp_path))
    stack = Stack(app, "Cycle", env={"account": ACCOUNT, "region": REGION})
    vpc = ec2.Vpc(
        stack,
        "Vpc",
        nat_gateways=0,
        availability_zones=[f"{REGION}a"],
        subnet_configuration=[ec2.SubnetConfiguration(name="h", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)],
    )
    role = iam.Role(stack, "Role", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
    template = ec2.LaunchTemplate(
        stack,
        "Lt",
        instance_type=ec2.InstanceType("m6i.xlarge"),
        machine_image=ec2.MachineImage.latest_amazon_linux2023(),
        role=role,
    )
    asg = autoscaling.AutoScalingGroup(stack, "Asg", vpc=vpc, launch_template=template)
    role.add_to_principal_policy(
        iam.PolicyStatement(
            actions=["autoscaling:CompleteLifecycleAction"],
            resources=[
                f"arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:*:autoScalingGroupName/{asg.auto_scaling_group_name}"
            ],
        )
    )
    app.synth()
    errors = _cfn_lint_errors(tmp_path / "Cycle.template.json")
    assert any(":E3004:" in e for e in errors), errors
