"""The enclave hosts: a launch template for an enclave-enabled Nitro instance, an Auto Scaling group
over several AZs, and a Network Load Balancer in front that passes TLS through (layer 4, no certificate).

Invariants:

* The instance role (``.role``) has an explicit name, so its literal ARN can be written into the model
  key's release statement before CloudFormation creates it (:attr:`role_arn`).
* Instances: Nitro Enclaves enabled, IMDSv2 required with a hop limit of 1 (a container or the enclave
  relay cannot reach IMDS through an extra hop), encrypted EBS volumes, no SSH key pair (SSM Session
  Manager only), placed in the private isolated subnets.
* User data installs the Nitro Enclaves CLI, sizes the allocator from the props, writes the vsock-proxy
  allowlist for the region's KMS endpoint only (:func:`parent_app.vsock_proxy.kms_allowlist`), writes
  the parent's configuration (:func:`parent_config`, loaded by :class:`parent_app.config.ParentConfig`)
  to ``/etc/nitrovault/parent.json`` (0600, root) and installs two nitrovault units:
  ``nitrovault-parent.service`` (``python -m parent_app /etc/nitrovault/parent.json``): the parent
  runs the TCP relay, the health endpoint, the host services *and* supervises the enclaves through
  ``nitro-cli``, beside AWS's ``nitro-enclaves-allocator.service`` and
  ``nitro-enclaves-vsock-proxy.service``; and ``nitrovault-lifecycle.service``, the termination watcher
  (below). Region, sizes and names are validated or typed values, never
  free text, and every file is written from a quoted heredoc, so nothing can inject shell through them.
* With the shared state store (``state_store_endpoint``), the allowlist holds the KMS entry and the
  store's endpoint (:func:`parent_app.vsock_proxy.kms_and_store_allowlist`), and a second vsock-proxy,
  ``vsock-proxy-state-store.service`` (an instance of AWS's relay, not a nitrovault unit), relays vsock
  port :data:`parent_app.vsock_proxy.STATE_STORE_VSOCK_PORT` to it
  (:func:`parent_app.vsock_proxy.store_proxy_argv`). The store host is the replication group's endpoint
  attribute, a CDK token: a literal host is validated at synth time, a token is rendered in place of a
  validated placeholder (CloudFormation fills it in through ``Fn::Join``) and the boot script checks the
  filled-in value against :data:`parent_app.vsock_proxy.STORE_HOST_PATTERN` before writing any file.
  The hosts' security group is ``.security_group`` (the store admits it on its port).
* TLS ends **inside the enclave**. The parent instance is untrusted: its public listener (``listen``,
  the target group's port) is a layer-4 relay that copies TLS records between the load balancer and the
  enclave's vsock port, and the load balancer's listener is plain TCP. Neither ever holds a certificate,
  a private key or plaintext; clients authenticate the enclave by its attestation and pin its
  certificate (``nitrovault attest pin``).
* Metrics: the parent serves Prometheus on loopback (``metrics_listen`` = :data:`METRICS_LISTEN`, no
  security group opens it); the CloudWatch agent scrapes it and ships the chosen metrics as EMF into
  ``/nitrovault/metrics`` (:func:`infra.constructs.observability.scrape_config` and
  :func:`~infra.constructs.observability.agent_prometheus_section`), where the alarms read them.
* Draining: the group has a termination lifecycle hook (:data:`parent_app.lifecycle.HOOK_NAME`, default
  result CONTINUE) whose heartbeat outlasts the parent's stop (:func:`drain_bounds`); the parent's unit
  stops with ``KillSignal=SIGTERM`` (``KillMode=mixed``: only the parent gets it, its nitro-cli children
  are left to finish) and ``TimeoutStopSec`` above ``drain_timeout_s`` + ``AUDIT_FLUSH_S``; a second
  unit, ``nitrovault-lifecycle.service`` (``python -m parent_app.lifecycle``), notices the termination
  in IMDS, stops the parent (which drains), and completes the action. It does not ``Requires=`` the
  parent (stopping the parent would stop it too). The role may ``DescribeAutoScalingInstances``
  (no resource-level permission exists) and ``CompleteLifecycleAction`` on this group only, in a policy
  of its own (the group's name in the role's default policy would be a cycle through the launch
  template); the hosts reach Auto Scaling through an interface endpoint that admits only their
  security group.
* Several enclaves (``enclave_count``): the allocator reserves ``count`` x the per-enclave memory and
  vCPUs, the parent config says ``enclave.count``; an instance type whose size names its vCPUs
  (:func:`instance_vcpus`) must leave the parent at least one vCPU.
* The load balancer health-checks the parent's ``health_listen`` port over HTTP (``GET /health``,
  healthy only on 200, which the parent answers only while the enclave reports SERVING), so a host
  whose enclave failed leaves the target group within about 20 s; the Auto Scaling group uses those
  ELB health checks. Inside the VPC, only the load balancer's security group may reach the relay and
  health ports, and the listener accepts only the client CIDR.

The enclave image and the parent's wheelhouse are read from the weights store at boot (there is no
internet route: see ``docs/deploy.md``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from collections.abc import Sequence
from typing import Any

from aws_cdk import Duration, Stack, Tags, Token
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from infra.constructs.observability import agent_prometheus_section, check_fleet, scrape_config
from infra.constructs.weights_store import ARTIFACTS_PREFIX, ENCLAVE_IMAGE_PREFIX, SEALED_PREFIX
from parent_app.config import MAX_ENCLAVES
from parent_app.host_sources import MODEL_ID
from parent_app.lifecycle import COMPLETE_FOR_S, HOOK_NAME, LOG_SHIP_WAIT_S, POLL_INTERVAL_S
from parent_app.lifecycle import PARENT_UNIT as _LIFECYCLE_STOPS
from parent_app.main import AUDIT_FLUSH_S
from parent_app.vsock_proxy import (
    DEFAULT_CONFIG_PATH,
    STORE_HOST_PATTERN,
    kms_allowlist,
    kms_and_store_allowlist,
    store_endpoint_host,
    store_proxy_argv,
    vsock_proxy_argv,
)

ALLOCATOR_PATH = "/etc/nitro_enclaves/allocator.yaml"
INSTALL_DIR = "/opt/nitrovault"
EIF_PATH = f"{INSTALL_DIR}/enclave.eif"
WHEELHOUSE = f"{INSTALL_DIR}/wheelhouse"
PROXY_DROPIN_DIR = "/etc/systemd/system/nitro-enclaves-vsock-proxy.service.d"
#: The parent's configuration file (``ParentConfig`` JSON), the argument of ``python -m parent_app``.
PARENT_CONFIG_PATH = "/etc/nitrovault/parent.json"
#: The parent's unix sockets and status file (tmpfs: nothing here outlives a boot).
RUN_DIR = "/run/nitrovault"
#: The enclave's signed audit lines, one folder per enclave boot (persistent, shipped to the enclave logs).
AUDIT_DIR = "/var/lib/nitrovault/audit"
PARENT_LOG = "/var/log/nitrovault/parent.log"
#: the parent's unit, the one the lifecycle watcher stops (``parent_app.lifecycle.PARENT_UNIT``)
PARENT_UNIT = _LIFECYCLE_STOPS
#: the termination watcher's unit and command (``python -m parent_app.lifecycle``)
LIFECYCLE_UNIT = "nitrovault-lifecycle.service"
DEFAULT_LIFECYCLE_COMMAND = (f"{INSTALL_DIR}/venv/bin/python", "-m", "parent_app.lifecycle")
#: the parent's Prometheus endpoint (``metrics_listen``): loopback, scraped by the CloudWatch agent only
METRICS_LISTEN = "127.0.0.1:9464"
AGENT_DIR = "/opt/aws/amazon-cloudwatch-agent/etc"
AGENT_CONFIG_PATH = f"{AGENT_DIR}/nitrovault.json"
PROMETHEUS_CONFIG_PATH = f"{AGENT_DIR}/nitrovault-prometheus.yaml"
#: seconds a drain (SIGTERM) gives calls in flight (``ParentConfig.drain_timeout_s``)
DEFAULT_DRAIN_TIMEOUT_S = 30.0
#: seconds the parent's stop may take beyond its drain bound: nitro-cli terminate-enclave for what is
#: left, closing the relays and the host services
STOP_MARGIN_S = 20
#: seconds the hook holds the instance beyond the watcher's poll, the parent's stop and the wait for the
#: log agent: the describe/complete calls and their retries (``parent_app.lifecycle.COMPLETE_FOR_S``)
HOOK_MARGIN_S = math.ceil(COMPLETE_FOR_S) + 5
#: AWS's units from ``aws-nitro-enclaves-cli``: hugepages/CPU carve-out, and the KMS-only vsock relay.
AWS_UNITS = ("nitro-enclaves-allocator.service", "nitro-enclaves-vsock-proxy.service")
#: The parent's command; the config path is appended.
DEFAULT_PARENT_COMMAND = (f"{INSTALL_DIR}/venv/bin/python", "-m", "parent_app")
#: The parent's TCP relay (``listen``): the target group's port; TLS records pass through to the enclave.
DEFAULT_RELAY_PORT = 50051
#: The parent's HTTP health endpoint (``health_listen``), the load balancer's health-check port.
DEFAULT_HEALTH_PORT = 8080
HEALTH_PATH = "/health"
#: The state store's relay (a second instance of AWS's vsock-proxy) and its log.
STORE_PROXY_UNIT = "vsock-proxy-state-store.service"
STORE_PROXY_LOG = "/var/log/nitrovault/vsock-proxy-state-store.log"
#: Stands in for a store host that CloudFormation fills in, while the validated text is rendered.
STORE_HOST_PLACEHOLDER = "state-store.placeholder.cache.amazonaws.com"
_ROLE_NAME = re.compile(r"[A-Za-z0-9+=,.@_-]{1,64}")
_COMPACT = (",", ":")
#: EC2 refuses user data above 16 KB (before base64)
USER_DATA_LIMIT = 16 * 1024


def _heredoc(path: str, content: str) -> list[str]:
    """Shell lines writing ``content`` to ``path`` verbatim (quoted delimiter: no expansion)."""
    if "NITROVAULT_EOF" in content:
        raise ValueError("file content must not contain the heredoc delimiter")
    return [f"cat > {shlex.quote(path)} <<'NITROVAULT_EOF'", content.rstrip("\n"), "NITROVAULT_EOF"]


def _enclave_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_ENCLAVES:
        raise ValueError(f"enclaves per instance must be an integer in 1..{MAX_ENCLAVES}, not {count!r}")
    return count


def allocator_yaml(memory_mib: int, cpu_count: int, count: int = 1) -> str:
    """``/etc/nitro_enclaves/allocator.yaml`` for ``count`` enclaves of the given size each: the allocator
    reserves the pool every ``nitro-cli run-enclave`` takes its memory and vCPUs from."""
    if memory_mib < 64 or cpu_count < 2 or cpu_count % 2:
        raise ValueError("the enclave needs >= 64 MiB and an even number (>= 2) of vCPUs (full cores)")
    count = _enclave_count(count)
    return f"---\nmemory_mib: {memory_mib * count}\ncpu_count: {cpu_count * count}\n"


_SIZE = re.compile(r"[a-z][a-z0-9-]*\.(?:(\d+)xlarge|(xlarge)|(large))")


def instance_vcpus(instance_type: str) -> int | None:
    """vCPUs of an EC2 instance type as its size names them (``large`` 2, ``xlarge`` 4, ``Nxlarge``
    4N: true of the current families), or ``None`` for other sizes (``metal``, ``medium``), unchecked."""
    found = _SIZE.fullmatch(instance_type)
    if found is None:
        return None
    n, xlarge, _large = found.groups()
    return 4 * int(n) if n else (4 if xlarge else 2)


def check_enclave_fit(instance_type: str, cpu_count: int, count: int) -> None:
    """``ValueError`` unless ``count`` enclaves of ``cpu_count`` vCPUs leave the parent at least one vCPU
    on ``instance_type`` (when its size names its vCPUs; otherwise a warning says it was not checked).
    Memory cannot be checked here (the instance type does not name it); the allocator refuses at boot."""
    vcpus = instance_vcpus(instance_type)
    taken = cpu_count * _enclave_count(count)
    if vcpus is None:
        logging.getLogger(__name__).warning(
            "cannot tell the vCPUs of %s: not checking that %d enclave vCPUs leave the parent one",
            instance_type, taken)
        return
    if taken > vcpus - 1:
        raise ValueError(
            f"{count} enclave(s) of {cpu_count} vCPUs take {taken} of {instance_type}'s {vcpus} vCPUs: the "
            "parent needs at least one (pick a larger instance type or fewer/smaller enclaves)"
        )


def drain_bounds(drain_timeout_s: float) -> tuple[int, int]:
    """(``TimeoutStopSec`` of the parent's unit, the termination hook's heartbeat timeout), in seconds.

    The stop outlasts the drain (``drain_timeout_s`` for calls in flight, ``AUDIT_FLUSH_S`` for the final
    audit checkpoints, :data:`STOP_MARGIN_S` for stopping what is left); the heartbeat outlasts the
    watcher's poll, that stop, the wait for the log agent and the API calls (:data:`HOOK_MARGIN_S`).
    """
    if isinstance(drain_timeout_s, bool) or not 0 < drain_timeout_s <= 3600:
        raise ValueError(f"drain_timeout_s must be in (0, 3600] seconds, not {drain_timeout_s!r}")
    stop = math.ceil(drain_timeout_s + AUDIT_FLUSH_S) + STOP_MARGIN_S
    heartbeat = stop + math.ceil(POLL_INTERVAL_S + LOG_SHIP_WAIT_S) + HOOK_MARGIN_S
    return stop, heartbeat


def systemd_unit(
    description: str,
    argv: Sequence[str],
    *,
    after: Sequence[str],
    log_file: str,
    restart: str = "always",
    stopping: Sequence[str] = (),
) -> str:
    """A hardened service unit running ``argv`` (quoted, never a shell), restarted ``restart``;
    ``stopping`` are extra ``[Service]`` lines about how it stops (``KillSignal=``, ``TimeoutStopSec=``)."""
    if restart not in ("always", "on-failure"):
        raise ValueError(f"unsupported Restart={restart!r}")
    return "\n".join(
        [
            "[Unit]",
            f"Description={description}",
            f"After={' '.join(after)}",
            f"Requires={' '.join(after)}",
            "",
            "[Service]",
            "ExecStart=" + " ".join(shlex.quote(a) for a in argv),
            f"Restart={restart}",
            "RestartSec=2",
            *stopping,
            f"StandardOutput=append:{log_file}",
            f"StandardError=append:{log_file}",
            "NoNewPrivileges=yes",
            "ProtectSystem=full",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def store_proxy_lines(region: str, host: str, port: int) -> tuple[str, list[str], list[str]]:
    """The allowlist (KMS and the store), the boot-time host check and the relay's unit-writing lines.

    ``host`` is validated when it is a literal; a CDK token is rendered where a validated placeholder
    stood, and the first returned line re-checks the resolved value on the host before anything is
    written (``grep -Eqx`` with :data:`STORE_HOST_PATTERN`; ``set -e`` stops the boot on a mismatch).
    """
    literal = STORE_HOST_PLACEHOLDER if Token.is_unresolved(host) else store_endpoint_host(host)

    def fill(text: str) -> str:
        return text.replace(literal, host)

    allowlist = fill(kms_and_store_allowlist(region, literal, port))
    unit = fill(
        systemd_unit(
            "vsock-proxy to the nitrovault state store (TLS from the enclave, relayed as TCP)",
            store_proxy_argv(literal, port, binary="/usr/bin/vsock-proxy"),
            after=("network-online.target",),
            log_file=STORE_PROXY_LOG,
        )
    )
    check = [
        f"printf '%s\\n' '{host}' | grep -Eqx '{STORE_HOST_PATTERN}' || "
        "{ echo 'the state store endpoint is not an ElastiCache host name' >&2; exit 1; }"
    ]
    return allowlist, check, _heredoc(f"/etc/systemd/system/{STORE_PROXY_UNIT}", unit)


def _port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"not a TCP port: {value!r}")
    return value


def parent_config(
    *,
    region: str,
    bucket_name: str,
    relay_port: int,
    health_port: int,
    memory_mib: int,
    cpu_count: int,
    count: int = 1,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    metrics_listen: str = METRICS_LISTEN,
) -> dict[str, Any]:
    """The parent's ``ParentConfig`` for an enclave host, as a JSON-ready dict.

    ``listen`` is the TCP relay on ``relay_port`` (TLS passthrough: the enclave terminates TLS, the
    parent only copies ciphertext, so no certificate or key is configured here); ``health_listen`` is
    the HTTP ``GET /health`` endpoint on ``health_port`` for the load balancer; ``metrics_listen`` the
    Prometheus endpoint on loopback for the CloudWatch agent. Instance-role credentials from IMDSv2,
    sealed models from ``s3://BUCKET/models/``, ``count`` enclaves (``cpu_count`` vCPUs and
    ``memory_mib`` each) started by ``nitro-cli`` from the image fetched at boot, ``drain_timeout_s`` for
    calls in flight on SIGTERM. ``kms_proxy_target`` is empty: AWS's vsock-proxy relays KMS.
    ``bucket_name`` may be a CDK token (it resolves inside the user data). The relay's connection limits
    keep ``parent_app``'s defaults.

    >>> config = parent_config(region="eu-west-1", bucket_name="b", relay_port=50051, health_port=8080,
    ...                        memory_mib=4096, cpu_count=2, count=2)
    >>> config["listen"], config["health_listen"], config["metrics_listen"], config["enclave"]["count"]
    ('0.0.0.0:50051', '0.0.0.0:8080', '127.0.0.1:9464', 2)
    """
    kms_allowlist(region)  # validates the region
    allocator_yaml(memory_mib, cpu_count, count)  # validates the sizes and the count
    drain_bounds(drain_timeout_s)  # validates the drain bound
    if _port(relay_port) == _port(health_port):
        raise ValueError(f"the relay and the health endpoint need two ports, not both {relay_port}")
    host, _, port = metrics_listen.rpartition(":")
    if host != "127.0.0.1" or _port(int(port)) in (relay_port, health_port):
        raise ValueError(f"metrics_listen must be a loopback port of its own, not {metrics_listen!r}")
    return {
        "listen": f"0.0.0.0:{relay_port}",
        "health_listen": f"0.0.0.0:{health_port}",
        "metrics_listen": metrics_listen,
        "region": region,
        "run_dir": RUN_DIR,
        "audit_dir": AUDIT_DIR,
        "credentials": {"kind": "imds"},
        "models": {"kind": "s3", "bucket": bucket_name, "prefix": SEALED_PREFIX},
        "enclave": {
            "kind": "nitro-cli",
            "eif": EIF_PATH,
            "cpu_count": cpu_count,
            "memory_mib": memory_mib,
            "count": count,
        },
        "drain_timeout_s": drain_timeout_s,
        "kms_proxy_target": "",
    }


class EnclaveHost(Construct):
    """``.role``, ``.role_arn`` (literal), ``.security_group``, ``.launch_template``, ``.asg``, ``.nlb``,
    ``.target_group``, ``.drain_hook``, ``.drain_policy``, ``.autoscaling_endpoint``, ``.enclave_count``,
    ``.stop_timeout_s``, ``.heartbeat_timeout_s``."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        vpc_cidr: str,
        host_subnets: ec2.SubnetSelection,
        role_name: str,
        weights_bucket: s3.IBucket,
        parent_log_group: logs.ILogGroup,
        enclave_log_group: logs.ILogGroup,
        metrics_log_group: logs.ILogGroup,
        access_log_bucket: s3.IBucket,
        fleet: str = "nitrovault",
        instance_type: str = "m6i.xlarge",
        enclave_memory_mib: int = 4096,
        enclave_cpu_count: int = 2,
        enclave_count: int = 1,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        relay_port: int = DEFAULT_RELAY_PORT,
        health_port: int = DEFAULT_HEALTH_PORT,
        listener_port: int = 443,
        client_cidr: str | None = None,
        internet_facing: bool = False,
        min_capacity: int = 2,
        max_capacity: int = 4,
        model_id: str = "model",
        parent_command: Sequence[str] = DEFAULT_PARENT_COMMAND,
        volume_size_gib: int = 64,
        state_store_endpoint: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        if not _ROLE_NAME.fullmatch(role_name):
            raise ValueError(f"not an IAM role name: {role_name!r}")
        if not MODEL_ID.match(model_id):
            raise ValueError(f"not a model id: {model_id!r}")
        check_fleet(fleet)
        allocator_yaml(enclave_memory_mib, enclave_cpu_count, enclave_count)
        check_enclave_fit(instance_type, enclave_cpu_count, enclave_count)
        self.enclave_count = enclave_count
        self.stop_timeout_s, self.heartbeat_timeout_s = drain_bounds(drain_timeout_s)
        stack = Stack.of(self)
        region = stack.region
        self.role_arn = f"arn:aws:iam::{stack.account}:role/{role_name}"

        self.role = iam.Role(
            self,
            "InstanceRole",
            role_name=role_name,
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="nitrovault enclave host: the only role the model key releases to (with attestation)",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        parent_log_group.grant_write(self.role)
        enclave_log_group.grant_write(self.role)
        metrics_log_group.grant_write(self.role)  # the agent's EMF events (the parent's metrics)

        host_sg = ec2.SecurityGroup(
            self, "HostSg", vpc=vpc, description="nitrovault enclave hosts", allow_all_outbound=True
        )
        self.security_group = host_sg
        lb_sg = ec2.SecurityGroup(
            self,
            "LoadBalancerSg",
            vpc=vpc,
            # (unchanged since the listener terminated TLS: a new description would replace the group)
            description="nitrovault gRPC load balancer",
            allow_all_outbound=False,
        )
        lb_sg.add_ingress_rule(
            ec2.Peer.ipv4(client_cidr or vpc_cidr),
            ec2.Port.tcp(listener_port),
            "clients: TLS to the enclave (passed through)",
        )
        # The hosts accept exactly two ports, and only from the load balancer (its security group is
        # honoured as the source even with client IP preservation on).
        for port, what in ((relay_port, "TLS relay to the enclave"), (health_port, "health endpoint")):
            lb_sg.add_egress_rule(host_sg, ec2.Port.tcp(port), f"to the parent's {what}")
            host_sg.add_ingress_rule(lb_sg, ec2.Port.tcp(port), f"load balancer to the parent's {what}")

        user_data = ec2.UserData.for_linux()
        user_data.add_commands(
            *self._boot_script(
                region=region,
                bucket_name=weights_bucket.bucket_name,
                memory_mib=enclave_memory_mib,
                cpu_count=enclave_cpu_count,
                count=enclave_count,
                drain_timeout_s=drain_timeout_s,
                parent_command=parent_command,
                relay_port=relay_port,
                health_port=health_port,
                parent_log_group=parent_log_group.log_group_name,
                enclave_log_group=enclave_log_group.log_group_name,
                metrics_log_group=metrics_log_group.log_group_name,
                fleet=fleet,
                state_store=state_store_endpoint,
            )
        )

        self.launch_template = ec2.LaunchTemplate(
            self,
            "LaunchTemplate",
            instance_type=ec2.InstanceType(instance_type),
            machine_image=ec2.MachineImage.latest_amazon_linux2023(),
            nitro_enclave_enabled=True,
            require_imdsv2=True,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            http_put_response_hop_limit=1,
            http_endpoint=True,
            role=self.role,
            security_group=host_sg,
            user_data=user_data,
            detailed_monitoring=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        volume_size_gib,
                        encrypted=True,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        delete_on_termination=True,
                    ),
                )
            ],
        )

        self.asg_max_capacity = max_capacity
        self.asg = autoscaling.AutoScalingGroup(
            self,
            "Asg",
            vpc=vpc,
            vpc_subnets=host_subnets,
            launch_template=self.launch_template,
            min_capacity=min_capacity,
            max_capacity=max_capacity,
            health_checks=autoscaling.HealthChecks.with_additional_checks(
                additional_types=[autoscaling.AdditionalHealthCheckType.ELB],
                grace_period=Duration.minutes(10),
            ),
        )
        # Which sealed model the hosts serve is the enclave image's (measured) choice; the tag only
        # tells operators which ``models/<id>.sealed`` these hosts are expected to fetch.
        Tags.of(self.asg).add("nitrovault:model", model_id)
        self._drain(vpc, host_subnets, host_sg, region, stack.account)

        self.nlb = elbv2.NetworkLoadBalancer(
            self,
            "Nlb",
            vpc=vpc,
            internet_facing=internet_facing,
            vpc_subnets=(
                ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC) if internet_facing else host_subnets
            ),
            security_groups=[lb_sg],
            cross_zone_enabled=True,
        )
        # An NLB writes access logs only for TLS listeners, so with the TCP (passthrough) listener this
        # stays empty; it is kept for cdk-nag ELB2 and for any TLS listener added later. Connections
        # show in the VPC flow logs.
        self.nlb.log_access_logs(access_log_bucket, "nlb")
        self.target_group = elbv2.NetworkTargetGroup(
            self,
            "Targets",
            vpc=vpc,
            port=relay_port,
            protocol=elbv2.Protocol.TCP,
            targets=[self.asg],
            deregistration_delay=Duration.seconds(30),
            # The relay sees the client's address (its per-source connection limits depend on it).
            preserve_client_ip=True,
            # Healthy means "the enclave reports SERVING", not "the parent accepts TCP": two failed
            # checks 10 s apart take a host out; three good ones bring it back.
            health_check=elbv2.HealthCheck(
                protocol=elbv2.Protocol.HTTP,
                port=str(health_port),
                path=HEALTH_PATH,
                healthy_http_codes="200",
                interval=Duration.seconds(10),
                timeout=Duration.seconds(5),
                healthy_threshold_count=3,
                unhealthy_threshold_count=2,
            ),
        )
        # Layer 4 only: the load balancer never holds a certificate or sees plaintext. The id "Tls" is the
        # former TLS-terminating listener's: CloudFormation changes its protocol in place, where a new
        # logical id would create a second listener on the same port before deleting the old one.
        self.nlb.add_listener(
            "Tls",
            port=listener_port,
            protocol=elbv2.Protocol.TCP,
            default_target_groups=[self.target_group],
        )

    def _drain(
        self,
        vpc: ec2.IVpc,
        subnets: ec2.SubnetSelection,
        host_sg: ec2.SecurityGroup,
        region: str,
        account: str,
    ) -> None:
        """The termination hook, what the watcher may call, and its way to Auto Scaling (no internet)."""
        self.drain_hook = self.asg.add_lifecycle_hook(
            "DrainHook",
            lifecycle_hook_name=HOOK_NAME,
            lifecycle_transition=autoscaling.LifecycleTransition.INSTANCE_TERMINATING,
            heartbeat_timeout=Duration.seconds(self.heartbeat_timeout_s),
            default_result=autoscaling.DefaultResult.CONTINUE,
        )
        group_arn = (
            f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:*:"
            f"autoScalingGroupName/{self.asg.auto_scaling_group_name}"
        )
        # A policy of its own: it names the group, which depends on the launch template, which depends on
        # the role (not on this policy).
        self.drain_policy = iam.Policy(
            self,
            "DrainPolicy",
            roles=[self.role],
            statements=[
                iam.PolicyStatement(actions=["autoscaling:CompleteLifecycleAction"], resources=[group_arn]),
                iam.PolicyStatement(actions=["autoscaling:DescribeAutoScalingInstances"], resources=["*"]),
            ],
        )
        # its two wildcards are excused in infra/nag.py (EnclaveHost/DrainPolicy/Resource)
        endpoint_sg = ec2.SecurityGroup(
            self,
            "AutoScalingEndpointSg",
            vpc=vpc,
            description="nitrovault Auto Scaling endpoint: HTTPS from the hosts only",
            allow_all_outbound=False,
        )
        endpoint_sg.add_ingress_rule(host_sg, ec2.Port.tcp(443), "enclave hosts: complete the drain hook")
        self.autoscaling_endpoint = ec2.InterfaceVpcEndpoint(
            self,
            "AutoScalingEndpoint",
            vpc=vpc,
            service=ec2.InterfaceVpcEndpointAwsService.AUTOSCALING,
            subnets=subnets,
            private_dns_enabled=True,
            security_groups=[endpoint_sg],
            open=False,
        )

    @staticmethod
    def _boot_script(
        *,
        region: str,
        bucket_name: str,
        memory_mib: int,
        cpu_count: int,
        parent_command: Sequence[str],
        relay_port: int,
        health_port: int,
        parent_log_group: str,
        enclave_log_group: str,
        metrics_log_group: str,
        fleet: str,
        count: int = 1,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        state_store: tuple[str, int] | None = None,
        lifecycle_command: Sequence[str] = DEFAULT_LIFECYCLE_COMMAND,
    ) -> list[str]:
        store_check: list[str] = []
        store_unit: list[str] = []
        if state_store is None:
            allowlist = kms_allowlist(region)  # validates the region too
        else:
            allowlist, store_check, store_unit = store_proxy_lines(region, *state_store)
        proxy_argv = vsock_proxy_argv(region)
        proxy_dropin = "\n".join(
            ["[Service]", "ExecStart=", "ExecStart=/usr/bin/" + " ".join(shlex.quote(a) for a in proxy_argv)]
        )
        config = parent_config(
            region=region,
            bucket_name=bucket_name,
            relay_port=relay_port,
            health_port=health_port,
            memory_mib=memory_mib,
            cpu_count=cpu_count,
            count=count,
            drain_timeout_s=drain_timeout_s,
        )
        stop_timeout, _ = drain_bounds(drain_timeout_s)
        scrape = scrape_config(METRICS_LISTEN, fleet)
        agent_config = {
            "logs": {
                # The parent's Prometheus endpoint, scraped on loopback, shipped as EMF (the alarms' metrics).
                "metrics_collected": {
                    "prometheus": agent_prometheus_section(
                        fleet, log_group_name=metrics_log_group, config_path=PROMETHEUS_CONFIG_PATH
                    )
                },
                "logs_collected": {
                    "files": {
                        "collect_list": [
                            # The parent process: relay, health endpoint, host services, enclave supervisor.
                            {
                                "file_path": PARENT_LOG,
                                "log_group_name": parent_log_group,
                                "log_stream_name": "{instance_id}",
                            },
                            # What the enclave itself emits: its chained, signed audit lines.
                            {
                                "file_path": f"{AUDIT_DIR}/*/audit-*.jsonl",
                                "log_group_name": enclave_log_group,
                                "log_stream_name": "{instance_id}",
                            },
                        ]
                    }
                }
            }
        }
        config_dir = PARENT_CONFIG_PATH.rsplit("/", 1)[0]
        lines = [
            "set -euo pipefail",
            *store_check,
            "dnf install -y aws-nitro-enclaves-cli aws-nitro-enclaves-cli-devel",
            "dnf install -y amazon-cloudwatch-agent python3.11",
            f"mkdir -p {INSTALL_DIR} /var/log/nitrovault {PROXY_DROPIN_DIR}",
            f"install -d -m 0700 -o root -g root {config_dir} {AUDIT_DIR}",
            *_heredoc(ALLOCATOR_PATH, allocator_yaml(memory_mib, cpu_count, count)),
            *_heredoc(DEFAULT_CONFIG_PATH, allowlist),
            *_heredoc(f"{PROXY_DROPIN_DIR}/kms-only.conf", proxy_dropin),
            # compact: user data is limited to 16 KB (EC2), and these two are its largest files
            *_heredoc(AGENT_CONFIG_PATH, json.dumps(agent_config, separators=_COMPACT)),
            *_heredoc(PROMETHEUS_CONFIG_PATH, json.dumps(scrape, separators=_COMPACT)),
            # The parent's config: created 0600 before anything is written into it.
            f"install -m 0600 -o root -g root /dev/null {PARENT_CONFIG_PATH}",
            *_heredoc(PARENT_CONFIG_PATH, json.dumps(config, indent=2, sort_keys=True)),
            f"chown root:root {PARENT_CONFIG_PATH} && chmod 0600 {PARENT_CONFIG_PATH}",
            # The enclave image and the parent's wheelhouse come from the weights store (no internet route).
            f'aws s3 cp "s3://{bucket_name}/{ENCLAVE_IMAGE_PREFIX}nitrovault.eif" {EIF_PATH}',
            f'aws s3 cp "s3://{bucket_name}/{ARTIFACTS_PREFIX}parent-wheelhouse.tar.gz" {WHEELHOUSE}.tar.gz',
            f"mkdir -p {WHEELHOUSE} && tar -xzf {WHEELHOUSE}.tar.gz -C {WHEELHOUSE}",
            f"python3.11 -m venv {INSTALL_DIR}/venv",
            f"{INSTALL_DIR}/venv/bin/pip install --no-index --find-links {WHEELHOUSE} nitrovault",
            *_heredoc(
                f"/etc/systemd/system/{PARENT_UNIT}",
                systemd_unit(
                    "nitrovault parent (TLS relay, health endpoint, host services, enclave supervisor)",
                    [*parent_command, PARENT_CONFIG_PATH],
                    after=AWS_UNITS,
                    log_file=PARENT_LOG,
                    # SIGTERM drains; only the parent gets it (its nitro-cli children finish their call),
                    # and systemd waits past the drain bound before it kills what is left.
                    stopping=("KillSignal=SIGTERM", "KillMode=mixed", f"TimeoutStopSec={stop_timeout}"),
                ),
            ),
            # The termination watcher: not Requires= the parent (stopping the parent would stop it too).
            *_heredoc(
                f"/etc/systemd/system/{LIFECYCLE_UNIT}",
                systemd_unit(
                    "nitrovault lifecycle watcher (drains the parent before Auto Scaling ends the host)",
                    [*lifecycle_command, "--region", region, "--stop-timeout", str(stop_timeout + 30)],
                    after=("network-online.target",),
                    log_file=PARENT_LOG,
                    restart="on-failure",
                ),
            ),
            *store_unit,
            "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s "
            f"-c file:{AGENT_CONFIG_PATH}",
            "systemctl daemon-reload",
            *(f"systemctl enable --now {unit}" for unit in AWS_UNITS),
            *([f"systemctl enable --now {STORE_PROXY_UNIT}"] if state_store is not None else []),
            f"systemctl enable --now {PARENT_UNIT}",
            f"systemctl enable --now {LIFECYCLE_UNIT}",
        ]
        return lines
