"""The CDK app entry point: ``python -m infra.app -c pcrManifest=pcr-manifest.json`` (or ``make synth``).

Context keys (``-c key=value``, or ``cdk.json``):

========================  ==========================================================================
``pcrManifest``           **required** (unless ``firstDeploy``): the image build's ``pcr-manifest.json``;
                          during an image rollout several, comma-separated (or a JSON list in
                          ``cdk.json``): the key is released to each image (``docs/deploy.md``)
``firstDeploy``           ``true`` for the first deploy's first phase, before any image exists: the model
                          key has no release statement (nothing can decrypt) and no manifest is read
``signerSet``             ``true`` also releases the key to every image signed with the manifests'
                          signing certificate (PCR8, and PCR3 when recorded): the next image signed by
                          the same owner key needs no policy change; every manifest must be signed
``account``               12-digit account (else ``CDK_DEFAULT_ACCOUNT``, else the placeholder
                          ``111122223333``, with a warning: fine for synth, wrong for deploy)
``region``                region (else ``CDK_DEFAULT_REGION``, else ``us-east-1``)
``modelId``, ``modelVersion``   the model's encryption context (default ``model`` / ``1``)
``namePrefix``            IAM role names and alias prefix (default ``nitrovault``)
``instanceType``          enclave-enabled Nitro instance type (default ``m6i.xlarge``)
``enclaveMemoryMib``, ``enclaveCpuCount``   each enclave's size (default 4096 / 2)
``enclaveCount``          enclaves per instance (default 1; the allocator reserves count x size, and
                          the instance type must leave the parent at least one vCPU)
``keyAdminArns``          comma-separated extra key administrators (roles/users of the account)
``deployRoleArn``         CloudFormation's deploy role (default: the CDK bootstrap ``cfn-exec-role``)
``canaryCiphertext``      base64 KMS ciphertext for the identity canary (default: a dummy blob)
``availabilityZones``     comma-separated AZ names (default: looked up by the ``cdk`` CLI)
``internetFacing``        ``true`` for a public load balancer (default internal)
``clientCidr``            who may reach the listener (default the VPC)
``nag``                   ``false`` to skip the cdk-nag AwsSolutions checks (default on)
``bootAlarmThreshold``    attested model-key Decrypts (enclave boots) per hour that alarm (default
                          3 x the Auto Scaling group's max size x enclaveCount); a positive integer
``cloudTrailLogGroup``    an existing trail's CloudWatch log group to count boots in (default: the
                          stack creates a trail delivering to ``/nitrovault/cloudtrail``)
``stateStore``            ``false`` to leave out the shared state store (ElastiCache for Valkey, the
                          enclaves' quotas, privacy budgets and extraction state; default on)
``unsafeAllowDebugPcrs``  ``true`` lets all-zero (debug) PCRs into the key policy: NEVER in production
========================  ==========================================================================

There is no certificate context: TLS ends inside the enclave and the load balancer forwards TCP (TLS
passthrough), so clients verify the enclave's attestation and pin its certificate instead of trusting
an ACM one. The retired ``certificateArn`` key is refused (:data:`RETIRED_CONTEXT_KEYS`), so a pipeline
still passing it learns that the load balancer no longer terminates TLS.

Invariants: the PCRs come only from the manifests (one format, ``nitrovault.policy.manifest``, read
through ``infra.pcr_manifest``), one release statement per manifest in the order given (then one per
distinct signing certificate with ``signerSet``); anything that weakens the key policy is named
``unsafe*`` and logs a warning; the cdk-nag AwsSolutions pack runs on every synth unless disabled; the
policy reviewer (``infra.review_aspect``) reviews every KMS key of the stack (the model key against the
manifests, each accepted measurement set against the manifest it matches; the store, logs and
alarm-topic keys too) on every synth, and a finding of severity high or above is a synthesis error
(lower ones are warnings, which the infra tests also keep at zero); ``nitrovault policy review`` does
the same with ``--pcr-manifest`` once per image.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")

from aws_cdk import App, Aspects, cx_api
from cdk_nag import AwsSolutionsChecks

from infra.nag import apply_suppressions
from infra.pcr_manifest import load_pcr_manifests
from infra.review_aspect import KeyPolicyReviewAspect
from infra.stacks.nitrovault_stack import NitrovaultStack, NitrovaultStackProps
from nitrovault.errors import ConfigError
from nitrovault.policy.manifest import PcrManifest

log = logging.getLogger(__name__)

PLACEHOLDER_ACCOUNT = "111122223333"
STACK_NAME = "Nitrovault"
#: context keys that no longer mean anything, and why (given one, the app stops instead of ignoring it)
RETIRED_CONTEXT_KEYS = {
    "certificateArn": "TLS now ends inside the enclave and the load balancer passes it through as TCP, "
    "so there is no load balancer certificate; clients pin the enclave's certificate "
    "(nitrovault attest pin, see docs/deploy.md)",
}
_ACCOUNT = re.compile(r"\d{12}")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"context {name} must be true or false, not {value!r}")


def _int(value: object, name: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise ConfigError(f"context {name} must be an integer, not {value!r}") from None


def _boot_threshold(value: object) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    threshold = _int(value, "bootAlarmThreshold")
    if threshold < 1:
        raise ConfigError(f"context bootAlarmThreshold must be a positive integer, not {value!r}")
    return threshold


def _manifest_paths(value: object) -> list[str]:
    """``pcrManifest``: one path, several comma-separated, or a list of paths (from ``cdk.json``)."""
    items = value if isinstance(value, list | tuple) else str(value or "").split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def _signer_sets(manifests: Sequence[PcrManifest]) -> tuple[dict[int, bytes], ...]:
    """One signer set per distinct signing certificate among ``manifests`` (all must be signed)."""
    sets: list[dict[int, bytes]] = []
    for manifest in manifests:
        signer = manifest.signer_pcrs()
        if signer not in sets:
            sets.append(signer)
    return tuple(sets)


def props_from_context(ctx: Mapping[str, Any], env: Mapping[str, str] | None = None) -> NitrovaultStackProps:
    """Build the stack props from CDK context (``ctx``) and the CDK CLI's environment (``env``)."""
    env = os.environ if env is None else env
    for key, why in RETIRED_CONTEXT_KEYS.items():
        if ctx.get(key) is not None:
            raise ConfigError(f"context {key} is no longer used: {why}; remove -c {key}=...")
    unsafe = _flag(ctx.get("unsafeAllowDebugPcrs", False), "unsafeAllowDebugPcrs")
    first_deploy = _flag(ctx.get("firstDeploy", False), "firstDeploy")
    signer = _flag(ctx.get("signerSet", False), "signerSet")
    manifests: tuple[PcrManifest, ...] = ()
    if first_deploy:
        if signer:
            raise ConfigError("context signerSet needs the image's manifest: it cannot go with firstDeploy")
        ignored = f" (pcrManifest={ctx['pcrManifest']} ignored)" if ctx.get("pcrManifest") else ""
        log.warning(
            "firstDeploy: the model key releases to no enclave image, nothing can decrypt%s; deploy again "
            "with -c pcrManifest=... once the image is built (docs/deploy.md, First deploy)",
            ignored,
        )
    else:
        paths = _manifest_paths(ctx.get("pcrManifest"))
        if not paths:
            raise ConfigError(
                "context pcrManifest is required: -c pcrManifest=path/to/pcr-manifest.json "
                "(before the first image exists: -c firstDeploy=true, see docs/deploy.md)"
            )
        manifests = load_pcr_manifests(paths, unsafe_allow_debug_pcrs=unsafe)
    signer_sets = _signer_sets(manifests) if signer else ()
    account = str(ctx.get("account") or env.get("CDK_DEFAULT_ACCOUNT") or "")
    if not account:
        account = PLACEHOLDER_ACCOUNT
        log.warning(
            "no account given (-c account=...): using the placeholder %s; do not deploy this", account
        )
    if not _ACCOUNT.fullmatch(account):
        raise ConfigError(f"context account must be 12 digits, not {account!r}")
    region = str(ctx.get("region") or env.get("CDK_DEFAULT_REGION") or "us-east-1")
    admins = [a.strip() for a in str(ctx.get("keyAdminArns") or "").split(",") if a.strip()]
    return NitrovaultStackProps(
        account=account,
        region=region,
        manifests=manifests,
        signer_sets=signer_sets,
        model_id=str(ctx.get("modelId") or "model"),
        model_version=str(ctx.get("modelVersion") or "1"),
        name_prefix=str(ctx.get("namePrefix") or "nitrovault"),
        instance_type=str(ctx.get("instanceType") or "m6i.xlarge"),
        enclave_memory_mib=_int(ctx.get("enclaveMemoryMib", 4096), "enclaveMemoryMib"),
        enclave_cpu_count=_int(ctx.get("enclaveCpuCount", 2), "enclaveCpuCount"),
        enclave_count=_int(ctx.get("enclaveCount", 1), "enclaveCount"),
        extra_admin_arns=tuple(admins),
        deploy_role_arn=str(ctx["deployRoleArn"]) if ctx.get("deployRoleArn") else None,
        canary_ciphertext_b64=str(ctx.get("canaryCiphertext") or ""),
        availability_zones=tuple(
            z.strip() for z in str(ctx.get("availabilityZones") or "").split(",") if z.strip()
        ),
        internet_facing=_flag(ctx.get("internetFacing", False), "internetFacing"),
        client_cidr=str(ctx["clientCidr"]) if ctx.get("clientCidr") else None,
        unsafe_allow_debug_pcrs=unsafe,
        boot_alarm_threshold=_boot_threshold(ctx.get("bootAlarmThreshold")),
        cloudtrail_log_group=str(ctx["cloudTrailLogGroup"]) if ctx.get("cloudTrailLogGroup") else None,
        state_store=_flag(ctx.get("stateStore", True), "stateStore"),
        tags={"project": "nitrovault", "model": str(ctx.get("modelId") or "model")},
    )


_CONTEXT_KEYS = (
    "pcrManifest",
    "firstDeploy",
    "signerSet",
    "account",
    "region",
    "modelId",
    "modelVersion",
    "namePrefix",
    "instanceType",
    "enclaveMemoryMib",
    "enclaveCpuCount",
    "enclaveCount",
    "keyAdminArns",
    "deployRoleArn",
    "canaryCiphertext",
    "availabilityZones",
    "internetFacing",
    "clientCidr",
    "nag",
    "unsafeAllowDebugPcrs",
    "bootAlarmThreshold",
    "cloudTrailLogGroup",
    "stateStore",
)


def build_app(
    context: Mapping[str, Any] | None = None, *, outdir: str | None = None
) -> tuple[App, NitrovaultStack]:
    """The app with its one stack and (unless ``nag=false``) the cdk-nag AwsSolutions checks."""
    app = App(context=dict(context or {}), outdir=outdir)
    ctx = {k: app.node.try_get_context(k) for k in (*_CONTEXT_KEYS, *RETIRED_CONTEXT_KEYS)}
    props = props_from_context({k: v for k, v in ctx.items() if v is not None})
    stack = NitrovaultStack(app, STACK_NAME, props=props)
    apply_suppressions(stack)
    # every accepted measurement set is compared with the manifest it matches (several in a rollout)
    Aspects.of(app).add(
        KeyPolicyReviewAspect(
            props.manifests or None, model_keys_only=False,
            unsafe_allow_debug_pcrs=props.unsafe_allow_debug_pcrs,
        )
    )
    if _flag(ctx.get("nag") if ctx.get("nag") is not None else True, "nag"):
        Aspects.of(app).add(AwsSolutionsChecks(verbose=True))
    return app, stack


def parse_argv(argv: Sequence[str]) -> dict[str, str]:
    """``-c key=value`` / ``--context key=value`` pairs, as the ``cdk`` CLI takes them."""
    context: dict[str, str] = {}
    items = iter(argv)
    for arg in items:
        if arg in ("-c", "--context"):
            pair = next(items, "")
        elif arg.startswith("--context="):
            pair = arg.split("=", 1)[1]
        else:
            raise ConfigError(f"unexpected argument {arg!r} (use -c key=value)")
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"context must be key=value, not {pair!r}")
        context[key] = value
    return context


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        context = parse_argv(sys.argv[1:] if argv is None else argv)
        app, _ = build_app(context, outdir=os.environ.get("CDK_OUTDIR") or "cdk.out")
    except ConfigError as exc:
        raise SystemExit(exc.diagnostics()) from None
    assembly = app.synth()
    errors = [
        f"{message.id}: {message.entry.data}"
        for stack in assembly.stacks
        for message in stack.messages
        if message.level == cx_api.SynthesisMessageLevel.ERROR
    ]
    if errors:
        raise SystemExit(
            "synthesis has errors (cdk-nag findings need a fix or a reasoned suppression; policy review "
            "findings need a fix of the key policy):\n"
            + "\n".join(errors)
        )


if __name__ == "__main__":
    main()
