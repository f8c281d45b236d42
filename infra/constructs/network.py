"""The VPC: private isolated subnets for the enclave hosts, VPC endpoints instead of a NAT.

Invariants:

* No NAT gateway by default: the hosts reach AWS only through interface endpoints for KMS, SSM
  (``ssm``, ``ssmmessages``, ``ec2messages``) and CloudWatch Logs, and the S3 gateway endpoint (which
  also serves the Amazon Linux 2023 package repositories).
* The endpoints accept HTTPS only from inside the VPC.
* Public subnets exist only when the load balancer is internet-facing (``public_subnets=True``); the
  hosts are never placed in them.
* VPC flow logs go to an encrypted log group (given by the caller).
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from constructs import Construct

INTERFACE_ENDPOINTS = {
    "Kms": ec2.InterfaceVpcEndpointAwsService.KMS,
    "Ssm": ec2.InterfaceVpcEndpointAwsService.SSM,
    "SsmMessages": ec2.InterfaceVpcEndpointAwsService.SSM_MESSAGES,
    "Ec2Messages": ec2.InterfaceVpcEndpointAwsService.EC2_MESSAGES,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
}


class Network(Construct):
    """``.vpc``, ``.host_subnets`` (private isolated), ``.endpoints`` (name -> interface endpoint)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        flow_log_group: logs.ILogGroup,
        max_azs: int = 3,
        nat_gateways: int = 0,
        public_subnets: bool = False,
        cidr: str = "10.40.0.0/16",
        availability_zones: Sequence[str] | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        #: the VPC's CIDR as a literal (security group rules use it, so cdk-nag can check them)
        self.cidr = cidr
        subnets = [
            ec2.SubnetConfiguration(
                name="hosts",
                subnet_type=(
                    ec2.SubnetType.PRIVATE_WITH_EGRESS if nat_gateways else ec2.SubnetType.PRIVATE_ISOLATED
                ),
                cidr_mask=22,
            )
        ]
        if public_subnets or nat_gateways:
            subnets.append(
                ec2.SubnetConfiguration(name="edge", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=26)
            )
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(cidr),
            # Explicit AZs keep an offline synth deployable; else the CDK CLI looks them up.
            max_azs=None if availability_zones else max_azs,
            availability_zones=list(availability_zones) if availability_zones else None,
            nat_gateways=nat_gateways,
            subnet_configuration=subnets,
            restrict_default_security_group=True,
            flow_logs={
                "all": ec2.FlowLogOptions(
                    destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_log_group),
                    traffic_type=ec2.FlowLogTrafficType.ALL,
                )
            },
        )
        self.host_subnets = ec2.SubnetSelection(subnet_group_name="hosts")
        endpoint_sg = ec2.SecurityGroup(
            self,
            "EndpointSg",
            vpc=self.vpc,
            description="VPC endpoints: HTTPS from the VPC only",
            allow_all_outbound=False,
        )
        endpoint_sg.add_ingress_rule(ec2.Peer.ipv4(cidr), ec2.Port.tcp(443), "HTTPS from the VPC")
        self.endpoints: dict[str, ec2.InterfaceVpcEndpoint] = {
            name: self.vpc.add_interface_endpoint(
                f"{name}Endpoint",
                service=service,
                subnets=self.host_subnets,
                private_dns_enabled=True,
                security_groups=[endpoint_sg],
                open=False,
            )
            for name, service in INTERFACE_ENDPOINTS.items()
        }
        self.s3_endpoint = self.vpc.add_gateway_endpoint(
            "S3Endpoint", service=ec2.GatewayVpcEndpointAwsService.S3, subnets=[self.host_subnets]
        )
