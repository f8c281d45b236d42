"""Accepted measurement sets: every release statement's PCRs, judged as a whole. Pure.

A key policy accepts several images by holding several release statements (the agreed encoding of
``nitrovault.policy.build``: one ``Allow`` per set, ``StringEqualsIgnoreCase`` with one value for each of
``kms:RecipientAttestation:PCR0``, ``PCR1``, ``PCR2``, optionally ``PCR3``/``PCR4``/``PCR8``; or a *signer
set*: a non-zero ``PCR8``, the image signing certificate's hash, without PCR0, so every image signed with
that certificate qualifies). A **set** is any ``Allow`` that yields plaintext and binds at least one PCR
(or ``ImageSha384``, which is PCR0) under an operator other than ``Null``; Sids do not matter.

Each set gets a :class:`~nitrovault.policy.review.findings.MeasurementSet` row and these findings:

* **NV-SET-DEBUG** (``debug-pcr``): every PCR0/1/2/8 it binds is all zeros -- a debug-mode enclave, which
  anyone can run with any code. ``proved`` when the evaluator releases the key to such an attestation.
* **NV-SET-MALFORMED** (``malformed-measurement-set``): a value that is not 96 hex digits (or not lower
  case under case-sensitive ``StringEquals``: KMS writes PCRs in lower case), several values for one PCR
  (in one statement the values of different PCRs combine freely, so sets mix: PCR1 of one image with
  PCR2 of another), or an operator other than ``StringEquals``/``StringEqualsIgnoreCase`` (``StringLike``
  even without a wildcard, a negation, ``IfExists``, a set operator).
* **NV-SET-UNSIGNED** (``unsigned-measurement-set``): PCR8 bound to all zeros (an unsigned image), or
  neither PCR0 nor PCR8 bound while PCR1/PCR2 are (nothing identifies the image); raised to high when the
  set binds no PCR0 and no signing certificate. A set binding none of PCR0/1/2/8 is NV-BIND-NO-IMAGE.

With several manifests, a manifest that no set accepts (the evaluator refuses its PCRs to every set's
principals) is NV-MANIFEST-MISMATCH at ``manifest[i]``: that reviewed image cannot obtain the key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review.findings import Collector, MeasurementSet, SetKind
from nitrovault.policy.review.probes import Prober, accepted_pcrs, probe_arn
from nitrovault.policy.review.reading import PINNING_OPERATORS, Reading, pcr_index, principals
from nitrovault.policy.review.statements import closest_manifest, identifies_signer

__all__ = ["check_manifests_accepted", "check_sets"]

_HEX96 = re.compile(r"[0-9a-fA-F]{96}")
_DEBUG_PCRS = (0, 1, 2, 8)


def _bindings(reading: Reading) -> dict[int, list[tuple[bool, str]]]:
    """PCR index -> (equality operator?, value) for every non-Null clause on a PCR key."""
    out: dict[int, list[tuple[bool, str]]] = {}
    for c in reading.attestation.clauses:
        index = pcr_index(c.key)
        if index is None or c.base == "Null":
            continue
        equality = (
            c.base in PINNING_OPERATORS and not c.negated and not c.if_exists and c.set_operator is None
        )
        for value in c.values:
            ok = bool(_HEX96.fullmatch(value)) and (c.base != "StringEquals" or value == value.lower())
            out.setdefault(index, []).append((equality, value.lower() if ok else ""))
    return out


def _cells(
    bindings: dict[int, list[tuple[bool, str]]], manifest: PcrManifest | None
) -> tuple[dict[str, str], list[str]]:
    """The set's PCR cells and what makes it malformed (PCR names, never values)."""
    cells: dict[str, str] = {}
    malformed: list[str] = []
    for index in sorted(bindings):
        name, items = f"PCR{index}", bindings[index]
        values = {v for _, v in items}
        if not all(eq for eq, _ in items):
            cells[name] = "not-equality"
            malformed.append(f"{name} under an operator other than StringEquals/StringEqualsIgnoreCase")
        elif "" in values:
            cells[name] = "malformed"
            malformed.append(f"a {name} value that is not 96 hex digits (lower case for StringEquals)")
        elif len(values) > 1:
            cells[name] = "several-values"
            malformed.append(f"{len(values)} values for {name} (sets mix: one statement per set)")
        elif not any(bytes.fromhex(next(iter(values)))):
            cells[name] = "unsigned" if index == 8 else "debug-zeros"
        elif manifest is None:
            cells[name] = "bound"
        else:
            cells[name] = "match" if manifest.pcrs.get(index, b"").hex() in values else "MISMATCH"
    return cells, malformed


def _single(bindings: dict[int, list[tuple[bool, str]]], index: int) -> str | None:
    values = {v for _, v in bindings.get(index, [])}
    return next(iter(values)) if len(values) == 1 and "" not in values else None


def _matching(bindings: dict[int, list[tuple[bool, str]]], manifests: Sequence[PcrManifest]) -> int | None:
    for i, m in enumerate(manifests):
        if all(index in m.pcrs and _single(bindings, index) == m.pcr_hex(index) for index in bindings):
            return i
    return None


def _debug_released(prober: Prober, reading: Reading) -> bool:
    """The evaluator releases the key through this statement to a debug-mode attestation."""
    pcrs = {**accepted_pcrs(reading.statement), **{i: bytes(48) for i in _DEBUG_PCRS}}
    for label in principals(reading.statement):
        who = probe_arn(label)
        if who is None:
            continue
        for action in reading.plaintext:
            decision = prober.decide(action, who, reading.context, pcrs)
            if decision.allowed and reading.statement.label in decision.matched_sids:
                return True
    return False


def _set(
    out: Collector, prober: Prober, reading: Reading, manifests: Sequence[PcrManifest]
) -> MeasurementSet | None:
    bindings = _bindings(reading)
    if not bindings:
        return None
    label = reading.statement.label
    matched = _matching(bindings, manifests)
    reference = matched if matched is not None else closest_manifest(reading.attestation, manifests)
    cells, malformed = _cells(bindings, manifests[reference] if reference is not None else None)
    signer = identifies_signer(reading.attestation)
    kind: SetKind = "image" if 0 in bindings else "signer" if signer else "unidentified"
    problems: list[str] = []

    debug = [_single(bindings, i) for i in _DEBUG_PCRS if i in bindings]
    if debug and all(v is not None and not any(bytes.fromhex(v)) for v in debug):
        problems.append("debug")
        released = _debug_released(prober, reading)
        out.add(
            "NV-SET-DEBUG", label,
            "this measurement set is a DEBUG-mode enclave (all-zero PCR0/1/2/8): anyone can run one with any "
            "code" + (" (proved: the evaluator releases the key to it)" if released else ""),
            proved=released,
        )
    if malformed:
        problems.append("malformed")
        out.add("NV-SET-MALFORMED", label, "malformed measurement set: " + "; ".join(malformed))
    pcr8 = _single(bindings, 8)
    zero_pcr8 = pcr8 is not None and not any(bytes.fromhex(pcr8))
    some_image = any(i in bindings for i in (0, 1, 2))
    if zero_pcr8 or (some_image and 0 not in bindings and 8 not in bindings):
        problems.append("unsigned")
        unidentified = 0 not in bindings and not signer
        why = "binds PCR8 to all zeros: an unsigned image" if zero_pcr8 else "binds neither PCR0 nor PCR8"
        out.add(
            "NV-SET-UNSIGNED", label,
            f"this measurement set {why}"
            + ("; with no PCR0 either, nothing identifies the image" if unidentified else ""),
            raised=unidentified,
        )
    return MeasurementSet(
        label,
        tuple(principals(reading.statement)),
        reading.plaintext,
        cells,
        kind,
        matched,
        tuple(problems),
    )


def check_sets(
    out: Collector, prober: Prober, readings: Sequence[Reading], manifests: Sequence[PcrManifest]
) -> tuple[MeasurementSet, ...]:
    """One :class:`MeasurementSet` per release statement, with its findings (module docstring)."""
    sets = [_set(out, prober, r, manifests) for r in readings if r.plaintext and r.attestation.clauses]
    return tuple(s for s in sets if s is not None)


def check_manifests_accepted(
    out: Collector, prober: Prober, readings: Sequence[Reading], manifests: Sequence[PcrManifest]
) -> None:
    """With several manifests: each must be accepted by some set (module docstring)."""
    releasing = [r for r in readings if r.plaintext and r.attestation.clauses]
    if len(manifests) < 2 or not releasing:
        return
    for i, m in enumerate(manifests):
        accepted = any(
            prober.allowed(action, who, r.context, m.pcrs)
            for r in releasing
            for who in filter(None, map(probe_arn, principals(r.statement)))
            for action in r.plaintext
        )
        if not accepted:
            out.add(
                "NV-MANIFEST-MISMATCH", f"manifest[{i}]",
                f"no accepted measurement set releases the key to manifest {i}'s image (proved by "
                "evaluation)",
                proved=True,
            )
