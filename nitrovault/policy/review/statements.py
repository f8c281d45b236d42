"""Statement-level checks: findings that follow from how one ``Allow`` statement is written, whoever its
principals are -- negated elements (``NotAction``, ``NotPrincipal``) and the attestation conditions
(operators, PCR values, which measurements are bound, comparison with the manifests). Pure.

With several manifests (an image rollout), each statement is compared with its **closest** manifest: the
one equal to the most of its bound PCRs (the first on a tie). The measurement-set checks
(:mod:`~nitrovault.policy.review.sets`) judge each release statement as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nitrovault.policy.conditions import ConditionClause
from nitrovault.policy.manifest import REQUIRED_PCRS, PcrManifest
from nitrovault.policy.review.findings import Collector
from nitrovault.policy.review.reading import PINNING_OPERATORS, Attestation, Reading, pcr_index

__all__ = ["check_attestation", "check_negations", "closest_manifest", "identifies_signer"]

_HEX96 = re.compile(r"[0-9a-f]{96}")
#: The image PCRs that are all zeros in a debug-mode enclave (PCR8 zeros alone is an unsigned image).
_IMAGE_PCRS = (0, 1, 2)
#: What a signer set (PCR8 without PCR0) may also bind that the manifest records: PCR3, the parent's role
#: (PCR4, the instance, would match one host only).
_SIGNER_OPTIONAL = (3,)


def check_negations(out: Collector, reading: Reading) -> None:
    """NV-NOTACTION and NV-NOTPRINCIPAL: a negated element that leaves plaintext actions allowed."""
    statement, plaintext, label = reading.statement, reading.plaintext, reading.statement.label
    if statement.not_actions is not None and plaintext:
        out.add("NV-NOTACTION", label, f"NotAction leaves plaintext actions allowed: {', '.join(plaintext)}")
    if statement.not_principal is not None and plaintext:
        out.add(
            "NV-NOTPRINCIPAL", label,
            "NotPrincipal in an Allow grants plaintext actions to everyone not listed",
        )


def identifies_signer(att: Attestation) -> bool:
    """The statement binds PCR8 (the signing certificate) to a value that is not all zeros."""
    return any(_HEX96.fullmatch(v.lower()) and any(bytes.fromhex(v)) for v in att.bound.get(8, ()))


def closest_manifest(att: Attestation, manifests: Sequence[PcrManifest]) -> int | None:
    """The index of the manifest equal to the most of the statement's bound PCRs (first on a tie)."""
    if not manifests:
        return None

    def score(m: PcrManifest) -> int:
        return sum(
            1
            for i, values in att.bound.items()
            if i in m.pcrs and m.pcr_hex(i) in {v.lower() for v in values}
        )

    scores = [score(m) for m in manifests]
    return scores.index(max(scores))


def check_attestation(
    out: Collector, reading: Reading, manifests: Sequence[PcrManifest]
) -> tuple[dict[str, str], int | None]:
    """Static checks of the attestation conditions, if any; returns the Grant rows' measurements column
    and the index of the closest manifest (None without manifests or attestation conditions)."""
    att, label = reading.attestation, reading.statement.label
    if not att.clauses:
        return {}, None
    closest = closest_manifest(att, manifests)
    manifest = manifests[closest] if closest is not None else None
    measurements: dict[str, str] = {}
    for c in att.clauses:
        name = c.key.split(":")[-1]
        _check_operator(out, label, c, name)
        if c.base == "Null" or c.negated:
            continue
        for value in c.values:
            cell = _check_value(out, label, c, name, value, manifest)
            if cell in ("bound", "match"):  # a finding's cell overrides; a clean one does not
                measurements.setdefault(name, cell)
            else:
                measurements[name] = cell
    _check_binding(out, label, att, manifest)
    return measurements, closest


def _check_operator(out: Collector, label: str, c: ConditionClause, name: str) -> None:
    """How one attestation clause is written: IfExists, set operators, negation, patterns, operator."""
    if c.if_exists:
        out.add(
            "NV-ATT-IFEXISTS", label,
            f"{c.operator} on {name}: a request WITHOUT an attestation document satisfies it",
        )
    if c.set_operator is not None:
        out.add(
            "NV-ATT-SETOP", label,
            f"{c.operator} on {name}: single-valued attestation keys take no set operator; "
            "ForAnyValue/ForAllValues make the binding bypassable",
        )
    if c.negated:
        out.add(
            "NV-ATT-NEGATED", label,
            f"{c.operator} on {name}: a negated operator admits every other measurement",
        )
    if c.base == "StringLike" and any("*" in v or "?" in v for v in c.values):
        out.add(
            "NV-ATT-PATTERN", label,
            f"StringLike with a wildcard on {name}: a pattern admits other images",
        )
    if c.base not in (*PINNING_OPERATORS, "StringLike", "Null"):
        out.add(
            "NV-ATT-OPERATOR", label,
            f"{c.operator} on {name}: use StringEqualsIgnoreCase to pin a measurement",
        )


def _check_value(
    out: Collector, label: str, c: ConditionClause, name: str, value: str, manifest: PcrManifest | None
) -> str:
    """One bound value: malformed, debug or unsigned zeros, or compared with the manifest; its cell."""
    index = pcr_index(c.key)
    if not _HEX96.fullmatch(value):
        hint = " (stray '0x' prefix)" if value.lower().startswith("0x") else ""
        out.add(
            "NV-PCR-MALFORMED", label,
            f"{name} value is not 96 lower-case hex digits{hint}: it never matches a real PCR",
        )
        return "malformed"
    if index in _IMAGE_PCRS and not any(bytes.fromhex(value)):
        out.add(
            "NV-PCR-DEBUG", label,
            f"{name} is all zeros: that is a DEBUG-mode enclave, which anyone can run with any code",
        )
        return "debug-zeros"
    if index == 8 and not any(bytes.fromhex(value)):
        return "unsigned"  # an unsigned image's PCR8 (NV-SET-UNSIGNED judges the set)
    if manifest is None or index is None:
        return "bound"
    if index not in manifest.pcrs:
        out.add(
            "NV-MANIFEST-EXTRA", label,
            f"{name} is bound but the manifest has no PCR{index}: the reviewed image is unknown here",
        )
        return "MISMATCH"
    if value != manifest.pcr_hex(index):
        out.add(
            "NV-MANIFEST-MISMATCH", label,
            f"{name} does not match the manifest: the policy releases to a different image (for a "
            "rollout, review against the manifest of every image the policy should accept)",
        )
        return "MISMATCH"
    return "match"


def _check_binding(out: Collector, label: str, att: Attestation, manifest: PcrManifest | None) -> None:
    """Which measurements the statement binds: not Null-only, an image or its signer, PCR0-2, the manifest's.

    A *signer set* binds a non-zero PCR8 (the image signing certificate) and no PCR0/1/2: every image signed
    with that certificate qualifies, by design (image rollouts), so PCR0-2 are not asked of it.
    """
    if att.clauses and all(c.base == "Null" for c in att.clauses):
        out.add(
            "NV-ATT-NULL-ONLY", label,
            "attestation conditions are Null-only: they test that a document is present, not which image",
        )
        return
    image = [i for i in _IMAGE_PCRS if i in att.bound]
    signer = identifies_signer(att)
    if not image and not signer:
        out.add(
            "NV-BIND-NO-IMAGE", label,
            "no image measurement (PCR0/1/2, ImageSha384, or a signing certificate's PCR8) is bound: any "
            "enclave code qualifies",
        )
    elif image:
        missing = [f"PCR{i}" for i in REQUIRED_PCRS if i not in att.bound]
        if missing:
            out.add(
                "NV-BIND-MISSING-PCR", label,
                f"{' and '.join(missing)} not bound: bind PCR0, PCR1 and PCR2 (defence in depth)",
            )
    if manifest is not None:
        expected = _SIGNER_OPTIONAL if signer and not image else manifest.pcrs
        for index in expected:
            if index in manifest.pcrs and index not in att.bound and index not in REQUIRED_PCRS:
                out.add(
                    "NV-MANIFEST-UNBOUND", label,
                    f"the manifest has PCR{index} but the statement does not bind it (defence in depth)",
                )
