"""The review of one key policy, and of every key of a CloudFormation template: the order in which the
checks run and what they share. Pure.

:func:`review_policy` parses the policy, reads the key's administrators and users
(:mod:`~nitrovault.policy.review.principals`), then for each ``Allow`` statement that yields plaintext
or escalates runs the statement-level checks (:mod:`~nitrovault.policy.review.statements`) and the
per-principal checks (exposure by evaluation, :mod:`~nitrovault.policy.review.exposure`); then the
measurement sets (:mod:`~nitrovault.policy.review.sets`), the administrators' Decrypt and the Deny checks
(:mod:`~nitrovault.policy.review.denies`). :func:`review_template` renders a template's key policies
(:mod:`nitrovault.policy.cfn`) and reviews each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nitrovault.policy.cfn import keys_from_template
from nitrovault.policy.evaluate import Policy, parse_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review.denies import check_deny
from nitrovault.policy.review.findings import Collector, Grant, KeyReview
from nitrovault.policy.review.principals import check_admin_decrypt, check_principals, key_roles
from nitrovault.policy.review.probes import PROBE_PCRS, Prober, default_key_arn
from nitrovault.policy.review.reading import Reading, read
from nitrovault.policy.review.sets import check_manifests_accepted, check_sets
from nitrovault.policy.review.statements import check_attestation, check_negations

__all__ = ["review_policy", "review_template"]


def _manifests(manifest: PcrManifest | Sequence[PcrManifest] | None) -> tuple[PcrManifest, ...]:
    if manifest is None:
        return ()
    if isinstance(manifest, PcrManifest):
        return (manifest,)
    return tuple(manifest)


def review_policy(
    policy: Mapping[str, Any] | str | bytes | Policy,
    *,
    key: str = "policy",
    source: str = "",
    manifest: PcrManifest | Sequence[PcrManifest] | None = None,
    key_arn: str | None = None,
    probe_pcrs: Mapping[int, bytes] = PROBE_PCRS,
) -> KeyReview:
    """Review one key policy; :class:`~nitrovault.errors.PolicyError` when it is malformed.

    ``manifest`` is the reviewed image's manifest, or several (an image rollout: every image the policy
    should accept, in order); ``probe_pcrs`` are the "foreign" measurements (a parameter so tests can pass
    their own randomness).
    """
    parsed = policy if isinstance(policy, Policy) else parse_policy(policy)
    manifests = _manifests(manifest)
    prober = Prober(parsed, key_arn or default_key_arn(key))
    out = Collector(key)
    grants: list[Grant] = []

    for i, m in enumerate(manifests):
        if m.is_debug:
            names = ", ".join(f"PCR{p}" for p in m.debug_pcrs)
            out.add(
                "NV-MANIFEST-DEBUG", "manifest" if len(manifests) == 1 else f"manifest[{i}]",
                f"the manifest's {names} are all zeros: a debug-mode image; never bind a production key to "
                "it",
            )

    roles = key_roles(parsed)
    readings: list[Reading] = []
    for statement in parsed.statements:
        if statement.effect != "Allow":
            continue
        reading = read(statement)
        if not reading.plaintext and not reading.escalation:
            continue
        readings.append(reading)
        check_negations(out, reading)
        measurements, closest = check_attestation(out, reading, manifests)
        grants += check_principals(
            out, prober, reading, measurements, roles, manifests, closest, probe_pcrs
        )

    sets = check_sets(out, prober, readings, manifests)
    check_manifests_accepted(out, prober, readings, manifests)
    check_admin_decrypt(out, prober, parsed.statements, roles, manifests, probe_pcrs)
    check_deny(out, prober)
    return KeyReview(key, source, tuple(grants), out.sorted(), sets)


def review_template(
    template: Mapping[str, Any],
    *,
    source: str = "template",
    manifest: PcrManifest | Sequence[PcrManifest] | None = None,
    account: str | None = None,
    region: str | None = None,
) -> list[KeyReview]:
    """Review every KMS key of a CloudFormation template (a key without KeyPolicy gets KMS's default)."""
    reviews = []
    for logical, policy in keys_from_template(template, account=account, region=region):
        key_arn = default_key_arn(logical, region, account)
        name = f"{source}/{logical}"
        reviews.append(review_policy(policy, key=name, source=source, manifest=manifest, key_arn=key_arn))
    return reviews
