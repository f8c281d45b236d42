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
  to ``/etc/nitrovault/parent.json`` (0600, root) and installs exactly one nitrovault unit,
  ``nitrovault-parent.service`` (``python -m parent_app /etc/nitrovault/parent.json``): the parent
  runs the TCP relay, the health endpoint, the host services *and* supervises the enclave through
  ``nitro-cli``, beside AWS's ``nitro-enclaves-allocator.service`` and
  ``nitro-enclaves-vsock-proxy.service``. Region, sizes and names are validated or typed values, never
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

from infra.constructs.weights_store import ARTIFACTS_PREFIX, ENCLAVE_IMAGE_PREFIX, SEALED_PREFIX
from parent_app.host_sources import MODEL_ID
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
PARENT_UNIT = "nitrovault-parent.service"
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


def _heredoc(path: str, content: str) -> list[str]:
    """Shell lines writing ``content`` to ``path`` verbatim (quoted delimiter: no expansion)."""
    if "NITROVAULT_EOF" in content:
        raise ValueError("file content must not contain the heredoc delimiter")
    return [f"cat > {shlex.quote(path)} <<'NITROVAULT_EOF'", content.rstrip("\n"), "NITROVAULT_EOF"]


def allocator_yaml(memory_mib: int, cpu_count: int) -> str:
    """``/etc/nitro_enclaves/allocator.yaml`` for the given enclave size."""
    if memory_mib < 64 or cpu_count < 2 or cpu_count % 2:
        raise ValueError("the enclave needs >= 64 MiB and an even number (>= 2) of vCPUs (full cores)")
    return f"---\nmemory_mib: {memory_mib}\ncpu_count: {cpu_count}\n"


def systemd_unit(description: str, argv: Sequence[str], *, after: Sequence[str], log_file: str) -> str:
    """A hardened ``Restart=always`` service unit running ``argv`` (quoted, never a shell)."""
    return "\n".join(
        [
            "[Unit]",
            f"Description={description}",
            f"After={' '.join(after)}",
            f"Requires={' '.join(after)}",
            "",
            "[Service]",
            "ExecStart=" + " ".join(shlex.quote(a) for a in argv),
            "Restart=always",
            "RestartSec=2",
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
    *, region: str, bucket_name: str, relay_port: int, health_port: int, memory_mib: int, cpu_count: int
) -> dict[str, Any]:
    """The parent's ``ParentConfig`` for an enclave host, as a JSON-ready dict.

    ``listen`` is the TCP relay on ``relay_port`` (TLS passthrough: the enclave terminates TLS, the
    parent only copies ciphertext, so no certificate or key is configured here); ``health_listen`` is
    the HTTP ``GET /health`` endpoint on ``health_port`` for the load balancer. Instance-role credentials
    from IMDSv2, sealed models from ``s3://BUCKET/models/``, the enclave started by ``nitro-cli`` from
    the image fetched at boot. ``kms_proxy_target`` is empty: AWS's vsock-proxy relays KMS.
    ``bucket_name`` may be a CDK token (it resolves inside the user data). The relay's connection limits
    keep ``parent_app``'s defaults.

    >>> config = parent_config(region="eu-west-1", bucket_name="b", relay_port=50051, health_port=8080,
    ...                        memory_mib=4096, cpu_count=2)
    >>> config["listen"], config["health_listen"], config["enclave"]["kind"]
    ('0.0.0.0:50051', '0.0.0.0:8080', 'nitro-cli')
    """
    kms_allowlist(region)  # validates the region
    allocator_yaml(memory_mib, cpu_count)  # validates the sizes
    if _port(relay_port) == _port(health_port):
        raise ValueError(f"the relay and the health endpoint need two ports, not both {relay_port}")
    return {
        "listen": f"0.0.0.0:{relay_port}",
        "health_listen": f"0.0.0.0:{health_port}",
        "region": region,
        "run_dir": RUN_DIR,
        "audit_dir": AUDIT_DIR,
        "credentials": {"kind": "imds"},
        "models": {"kind": "s3", "bucket": bucket_name, "prefix": SEALED_PREFIX},
        "enclave": {"kind": "nitro-cli", "eif": EIF_PATH, "cpu_count": cpu_count, "memory_mib": memory_mib},
        "kms_proxy_target": "",
    }


class EnclaveHost(Construct):
    """``.role``, ``.role_arn`` (literal), ``.security_group``, ``.launch_template``, ``.asg``, ``.nlb``,
    ``.target_group``."""

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
        access_log_bucket: s3.IBucket,
        instance_type: str = "m6i.xlarge",
        enclave_memory_mib: int = 4096,
        enclave_cpu_count: int = 2,
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
                parent_command=parent_command,
                relay_port=relay_port,
                health_port=health_port,
                parent_log_group=parent_log_group.log_group_name,
                enclave_log_group=enclave_log_group.log_group_name,
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
        state_store: tuple[str, int] | None = None,
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
        )
        agent_config = {
            "logs": {
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
            *_heredoc(ALLOCATOR_PATH, allocator_yaml(memory_mib, cpu_count)),
            *_heredoc(DEFAULT_CONFIG_PATH, allowlist),
            *_heredoc(f"{PROXY_DROPIN_DIR}/kms-only.conf", proxy_dropin),
            *_heredoc(
                "/opt/aws/amazon-cloudwatch-agent/etc/nitrovault.json", json.dumps(agent_config, indent=2)
            ),
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
                ),
            ),
            *store_unit,
            "/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s "
            "-c file:/opt/aws/amazon-cloudwatch-agent/etc/nitrovault.json",
            "systemctl daemon-reload",
            *(f"systemctl enable --now {unit}" for unit in AWS_UNITS),
            *([f"systemctl enable --now {STORE_PROXY_UNIT}"] if state_store is not None else []),
            f"systemctl enable --now {PARENT_UNIT}",
        ]
        return lines
