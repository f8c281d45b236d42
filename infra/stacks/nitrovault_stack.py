"""The one deployable stack: composes the constructs, defines no resource itself.

Order matters only through explicit dependencies: every key policy names its principals by literal ARN
(the model key: the enclave host role, the operator roles and CloudFormation's deploy role; the store key:
the administrators, the sealer and the enclave host role; the logs and alarm-topic keys: the
administrators), so each key depends on the roles it names (KMS refuses a policy naming a principal that
does not exist yet). The identity canary's role is deliberately in no key policy.

Every key's policy comes from :mod:`nitrovault.policy.build` and none names the account root; the
synth-time review (``infra/review_aspect.py``) reviews all of them.

The model key's release statements come from ``props.manifests`` (one per image; none in the first
deploy's first phase) and ``props.signer_sets``. The outputs ``ModelKeyArn``, ``ModelId``,
``ModelVersion`` and ``StateStoreEndpointAddress`` are what ``nitrovault deploy enclave-config`` reads from
``cdk deploy --outputs-file`` to write the measured enclave config; the key keeps its logical id whatever
the sets, so its ARN survives every later deploy (``docs/deploy.md``, "First deploy").

The shared state store (``state_store``, on by default) is created before the hosts, whose boot script
needs its endpoint; it then admits the hosts' security group, denies the host role its passwords (in the
role's policy and, by literal ARN, in the secrets' resource policies, which therefore depend on the
role) and lets the sealer, its owner, read the enclave user's password once to seal it with the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aws_cdk import CfnOutput, Environment, Stack, Tags
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.constructs.boot_watch import BootWatch
from infra.constructs.enclave_host import EnclaveHost
from infra.constructs.identity_canary import IdentityCanary
from infra.constructs.model_key import ModelKey
from infra.constructs.network import Network
from infra.constructs.observability import Observability
from infra.constructs.operators import OperatorRoles
from infra.constructs.state_store import StateStore
from infra.constructs.weights_store import WeightsStore
from infra.pcr_manifest import PcrManifest


@dataclass(frozen=True)
class NitrovaultStackProps:
    """Everything the stack needs; built from CDK context by :mod:`infra.app`."""

    #: the 12-digit account and the region to deploy into (both literal: the key policy needs them)
    account: str
    region: str
    #: the reviewed enclave images' measurements, one release statement each, in order: one image, two
    #: during a rollout, none in the first deploy's first phase (nothing can decrypt yet)
    manifests: Sequence[PcrManifest]
    #: signer sets (PCR8, optionally PCR3) released to besides the images (``signerSet``)
    signer_sets: Sequence[Mapping[int, bytes]] = ()
    #: model identity, bound as the encryption context {"model": ..., "version": ...}
    model_id: str = "model"
    model_version: str = "1"
    #: prefix of every IAM role name and of the key alias
    name_prefix: str = "nitrovault"
    instance_type: str = "m6i.xlarge"
    enclave_memory_mib: int = 4096
    enclave_cpu_count: int = 2
    #: enclaves per instance (each ``enclave_memory_mib`` and ``enclave_cpu_count``; the allocator
    #: reserves the sum, and the instance type must leave the parent a vCPU)
    enclave_count: int = 1
    #: extra key administrators (existing roles/users of the account), besides the created admin role
    extra_admin_arns: Sequence[str] = ()
    #: the role CloudFormation deploys with; it must stay a key administrator to update the policy
    deploy_role_arn: str | None = None
    #: base64 KMS ciphertext (the wrapped data key from a sealed model's header) for the canary to try
    canary_ciphertext_b64: str = ""
    #: AZ names for the VPC (at least two); empty: the CDK CLI looks them up for the account
    availability_zones: Sequence[str] = ()
    internet_facing: bool = False
    client_cidr: str | None = None
    log_retention: logs.RetentionDays = logs.RetentionDays.ONE_YEAR
    unsafe_allow_debug_pcrs: bool = False
    #: attested model-key Decrypts (boots) per hour that alarm; None: 3 x the ASG's max size (see below)
    boot_alarm_threshold: int | None = None
    #: an existing CloudTrail trail's CloudWatch log group; None: the stack creates a trail
    cloudtrail_log_group: str | None = None
    #: the shared state store (ElastiCache for Valkey) for quotas, privacy budgets and extraction state
    state_store: bool = True
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def encryption_context(self) -> dict[str, str]:
        return {"model": self.model_id, "version": self.model_version}

    @property
    def admin_deploy_role_arn(self) -> str:
        return self.deploy_role_arn or (
            f"arn:aws:iam::{self.account}:role/cdk-hnb659fds-cfn-exec-role-{self.account}-{self.region}"
        )

    @property
    def weights_bucket_name(self) -> str:
        """Explicit (the store key's policy names the bucket): prefix, account and region make it unique."""
        return f"{self.name_prefix.lower()}-weights-{self.account}-{self.region}"


class NitrovaultStack(Stack):
    """Exposes its constructs: ``.model_key``, ``.store``, ``.network``, ``.observability``, ``.host``,
    ``.canary``, ``.operators``, ``.state_store`` (None when ``props.state_store`` is off)."""

    def __init__(self, scope: Construct, construct_id: str, *, props: NitrovaultStackProps) -> None:
        images = "; ".join(
            f"image {m.image_digest or 'unknown'}, commit {m.source_commit or 'unknown'}"
            for m in props.manifests
        )
        description = (
            f"nitrovault: model {props.model_id} v{props.model_version} served from attested Nitro Enclaves"
            f" ({images or 'no image yet: the model key releases to no enclave'})"
        )
        super().__init__(
            scope,
            construct_id,
            env=Environment(account=props.account, region=props.region),
            description=description[:1024],
        )
        self.operators = OperatorRoles(self, "Operators", name_prefix=props.name_prefix)
        admin_arns = [self.operators.admin_arn, props.admin_deploy_role_arn, *props.extra_admin_arns]
        admin_role = _cfn_role(self.operators.admin_role)
        sealer_role = _cfn_role(self.operators.sealer_role)
        self.observability = Observability(
            self,
            "Observability",
            admin_arns=admin_arns,
            principals_created_by=[admin_role],
            retention=props.log_retention,
            fleet=props.name_prefix,  # the metrics' ``fleet`` dimension
        )
        flow_logs = self.observability.log_group("FlowLogs", "/nitrovault/vpc-flow")
        self.network = Network(
            self,
            "Network",
            flow_log_group=flow_logs,
            public_subnets=props.internet_facing,
            availability_zones=props.availability_zones or None,
        )
        host_role_name = f"{props.name_prefix}-enclave-host"
        host_role_arn = f"arn:aws:iam::{props.account}:role/{host_role_name}"
        self.store = WeightsStore(
            self,
            "WeightsStore",
            bucket_name=props.weights_bucket_name,
            account_id=props.account,
            region=props.region,
            admin_arns=admin_arns,
            writer_arns=[self.operators.sealer_arn],
            reader_arns=[host_role_arn],
        )
        self.store.grant_write(self.operators.sealer_role)
        self.state_store: StateStore | None = None
        if props.state_store:
            self.state_store = StateStore(
                self,
                "StateStore",
                vpc=self.network.vpc,
                subnets=self.network.host_subnets,
                owner_arns=[self.operators.sealer_arn],
                deploy_role_arn=props.admin_deploy_role_arn,
                denied_role_arns=[host_role_arn],
                id_prefix=props.name_prefix,
            )
        self.host = EnclaveHost(
            self,
            "EnclaveHost",
            vpc=self.network.vpc,
            vpc_cidr=self.network.cidr,
            host_subnets=self.network.host_subnets,
            role_name=host_role_name,
            weights_bucket=self.store.bucket,
            parent_log_group=self.observability.parent_logs,
            enclave_log_group=self.observability.enclave_logs,
            metrics_log_group=self.observability.metrics_logs,
            fleet=self.observability.fleet,
            access_log_bucket=self.store.log_bucket,
            instance_type=props.instance_type,
            enclave_memory_mib=props.enclave_memory_mib,
            enclave_cpu_count=props.enclave_cpu_count,
            enclave_count=props.enclave_count,
            internet_facing=props.internet_facing,
            client_cidr=props.client_cidr,
            model_id=props.model_id,
            state_store_endpoint=(
                (self.state_store.endpoint_address, self.state_store.port) if self.state_store else None
            ),
        )
        if self.host.role_arn != host_role_arn:  # the store key must name the role the hosts really get
            raise RuntimeError(f"enclave host role {self.host.role_arn!r} is not {host_role_arn!r}")
        self.store.grant_read(self.host.role)
        for role in (admin_role, sealer_role, _cfn_role(self.host.role)):
            self.store.key.node.add_dependency(role)
        if self.state_store is not None:
            self.state_store.admit(self.host.security_group)
            self.state_store.deny_password_read(self.host.role)
            self.state_store.grant_password_read(self.operators.sealer_role, self.operators.sealer_arn)
            for policy in self.state_store.resource_policies:
                policy.node.add_dependency(_cfn_role(self.host.role))
        self.model_key = ModelKey(
            self,
            "ModelKey",
            account_id=props.account,
            admin_arns=admin_arns,
            sealer_arns=[self.operators.sealer_arn],
            enclave_role_arns=[self.host.role_arn],
            pcr_sets=[m.pcrs for m in props.manifests],
            signer_sets=props.signer_sets,
            encryption_context=props.encryption_context,
            principals_created_by=[self.operators, self.host.role],
            unsafe_allow_debug_pcrs=props.unsafe_allow_debug_pcrs,
            alias_name=f"alias/{props.name_prefix}/{props.model_id}",
        )
        self.canary = IdentityCanary(
            self,
            "IdentityCanary",
            model_key_arn=self.model_key.key.key_arn,
            role_name=f"{props.name_prefix}-identity-canary",
            observability=self.observability,
            encryption_context=props.encryption_context,
            ciphertext_b64=props.canary_ciphertext_b64,
        )
        # Default: 3 x the ASG's max size x the enclaves per host, per hour. A rolling instance refresh boots
        # every enclave once and a crash loop is already caught by EnclaveRestarts; three full fleets of
        # boots in one hour is more than any legitimate roll, so the alarm means someone is releasing the
        # key unusually often.
        threshold = props.boot_alarm_threshold or 3 * self.host.asg_max_capacity * self.host.enclave_count
        self.boots = BootWatch(
            self,
            "BootWatch",
            observability=self.observability,
            model_key_arn=self.model_key.key.key_arn,
            threshold=threshold,
            access_log_bucket=self.store.log_bucket,
            existing_log_group=props.cloudtrail_log_group,
        )
        CfnOutput(self, "BootMetricName", value="nitrovault/AttestedModelKeyDecrypts")
        CfnOutput(self, "BootAlarmName", value=self.boots.alarm.alarm_name)
        CfnOutput(self, "ModelKeyArn", value=self.model_key.key.key_arn)
        # What the measured enclave config needs besides the key ARN (`nitrovault deploy enclave-config`),
        # and how many measurement sets the key is released to (0 in the first deploy's first phase).
        CfnOutput(self, "ModelId", value=props.model_id)
        CfnOutput(self, "ModelVersion", value=props.model_version)
        CfnOutput(self, "ModelKeyReleaseSets", value=str(self.model_key.release_sets))
        CfnOutput(self, "WeightsBucket", value=self.store.bucket.bucket_name)
        CfnOutput(self, "LoadBalancerDns", value=self.host.nlb.load_balancer_dns_name)
        # the group an image rollout refreshes (docs/deploy.md, "Rolling out a new image")
        CfnOutput(self, "AutoScalingGroupName", value=self.host.asg.auto_scaling_group_name)
        CfnOutput(self, "EnclaveRoleArn", value=self.host.role_arn)
        CfnOutput(self, "SealerRoleArn", value=self.operators.sealer_arn)
        if self.state_store is not None:
            # The image build bakes the endpoint into the measured enclave config
            # (scripts/enclave_config.py --state-store-endpoint HOST:PORT).
            CfnOutput(self, "StateStoreEndpointAddress", value=self.state_store.endpoint_address)
            CfnOutput(
                self,
                "StateStoreEndpointPort",
                value=self.state_store.replication_group.attr_primary_end_point_port,
            )
            CfnOutput(self, "StateStoreSecretArn", value=self.state_store.secret.secret_arn)
        for key, value in props.tags.items():
            Tags.of(self).add(key, value)


def _cfn_role(role: iam.Role) -> iam.CfnRole:
    """The role's CloudFormation resource alone (a key that depends on the whole ``iam.Role`` would depend
    on its default policy too, which may reference what the key encrypts: a cycle)."""
    cfn = role.node.default_child
    if not isinstance(cfn, iam.CfnRole):
        raise TypeError("iam.Role has no CfnRole child: the CDK version changed its structure")
    return cfn
