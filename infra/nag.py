"""cdk-nag AwsSolutions suppressions: each one names the rule, the resource and why it does not apply.

Suppressions are added by construct path inside the stack (never stack-wide) and, for IAM5, only for
the exact wildcard they excuse (``applies_to``), so a new resource or a new wildcard that trips a rule
fails the nag test instead of being silently covered.

Paths under an optional construct (:data:`OPTIONAL_ROOTS`: the state store, context ``stateStore``) are
skipped when the stack does not have that construct; every other path must exist.
"""

from __future__ import annotations

from aws_cdk import Stack
from cdk_nag import NagPackSuppression, NagSuppressions, RegexAppliesTo

_OBJECT_PREFIXES = RegexAppliesTo(
    regex=r"/^Resource::<WeightsStoreBucket[0-9A-F]+\.Arn>\/(models|enclave|artifacts)\/\*$/g"
)

_DRAIN_GROUP = RegexAppliesTo(
    regex=r"/^Resource::arn:aws:autoscaling:[a-z0-9-]+:\d{12}:autoScalingGroup:\*:"
    r"autoScalingGroupName\/<[A-Za-z0-9]+>$/g"
)

#: (construct path below the stack, rule id, reason, applies_to)
SUPPRESSIONS: tuple[tuple[str, str, str, tuple[str | RegexAppliesTo, ...]], ...] = (
    (
        "EnclaveHost/InstanceRole",
        "AwsSolutions-IAM4",
        "AmazonSSMManagedInstanceCore is the AWS-maintained policy for SSM Session Manager, which replaces "
        "SSH on the hosts (no key pair, no inbound port); tracking its action list by hand would drift.",
        ("Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore",),
    ),
    (
        "EnclaveHost/InstanceRole/DefaultPolicy",
        "AwsSolutions-IAM5",
        "s3:GetObject on three object prefixes of the weights bucket (sealed models, the enclave image, the "
        "parent's wheelhouse): object keys are not known at deploy time; sealed models are useless without "
        "the attested key release.",
        (_OBJECT_PREFIXES,),
    ),
    (
        "Operators/Sealer/DefaultPolicy",
        "AwsSolutions-IAM5",
        "The sealer publishes what the hosts fetch under three prefixes of the weights bucket (sealed "
        "models, the enclave image, the parent's wheelhouse); object keys (model names, versions, builds) "
        "are not known at deploy time.",
        (_OBJECT_PREFIXES,),
    ),
    (
        "EnclaveHost/DrainPolicy/Resource",
        "AwsSolutions-IAM5",
        "autoscaling:DescribeAutoScalingInstances supports no resource-level permission (Resource *); "
        "CompleteLifecycleAction is scoped to this group, whose ARN has a generated id in place of the '*'. "
        "The lifecycle watcher (parent_app/lifecycle.py) needs exactly these two.",
        ("Resource::*", _DRAIN_GROUP),
    ),
    (
        "IdentityCanary/Role/DefaultPolicy",
        "AwsSolutions-IAM5",
        "cloudwatch:PutMetricData supports no resource-level permission; the statement is restricted to the "
        "nitrovault namespace with a cloudwatch:namespace condition.",
        ("Resource::*",),
    ),
    (
        "StateStore/ReplicationGroup",
        "AwsSolutions-AEC6",
        "The store authenticates with RBAC instead of one shared AUTH token: a user group whose enclave "
        "user has a generated password and a key-prefix-limited access string, and whose default user is "
        "off. IAM authentication is deliberately not used: the hostile parent holds the instance role.",
        (),
    ),
    (
        "StateStore/EnclaveUserSecret/Resource",
        "AwsSolutions-SMG4",
        "The enclave user's password is read once by the owner and sealed with the model; only the "
        "attested enclave learns it. A rotation would lock the enclaves out until the model is resealed, "
        "so it is rotated by resealing (docs/deploy.md, The shared state store), not on a schedule.",
        (),
    ),
    (
        "StateStore/DefaultUserSecret/Resource",
        "AwsSolutions-SMG4",
        "Password of the replacement default user, whose access string is off: nobody can authenticate "
        "as it whatever the password, ElastiCache only requires one, and no principal reads the secret.",
        (),
    ),
    (
        "EnclaveHost/Asg/ASG",
        "AwsSolutions-AS3",
        "Scaling activity is recorded in the group's activity history and CloudTrail; what matters for "
        "operations (enclave restarts, key-release failures, canary breaches) alarms to the encrypted "
        "alarm topic. ASG notifications would need the Auto Scaling service-linked role in its key policy.",
        (),
    ),
)


#: top-level constructs the stack may leave out (their suppressions are skipped then)
OPTIONAL_ROOTS = ("StateStore",)


def apply_suppressions(stack: Stack) -> None:
    for path, rule, reason, applies_to in SUPPRESSIONS:
        root = path.split("/", 1)[0]
        if root in OPTIONAL_ROOTS and stack.node.try_find_child(root) is None:
            continue
        suppression = (
            NagPackSuppression(id=rule, reason=reason, applies_to=list(applies_to))
            if applies_to
            else NagPackSuppression(id=rule, reason=reason)
        )
        NagSuppressions.add_resource_suppressions_by_path(stack, f"/{stack.stack_name}/{path}", [suppression])
