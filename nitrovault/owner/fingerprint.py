"""Per-copy fingerprints (traitor tracing): every sealed copy is hardened under its own secret, and a leaked
file names the copy it came from (docs/hardening.md).

* **Copies.** A copy's secret is ``HKDF-SHA256(master, info = "nitrovault/harden/v1/copy" || 0x00 ||
  copy_id)`` (RFC 5869): the owner keeps one master key file; the :class:`Registry` (a JSON file) records
  the copy ids, the hardening parameters, a public id of the master key and a digest of the reference
  model, never a model or a secret.
* **Identification.** :func:`identify` re-aligns the suspect's units to the reference
  (:func:`nitrovault.owner.harden.align`) and runs two tests per registered copy, both exact bounds
  under H0 "the suspect does not depend on this copy's secret" (the copy's plan is then independent of
  the suspect, and uniformly random):

  1. *Order.* In each group, the reference units matched with correlation at least
     :data:`MIN_MATCH` (a set chosen from the suspect and the reference alone) are ranked twice: by
     where the suspect has them and by where the copy's secret permutation put them. ``k`` = the units
     with the same rank in both. The copy's ranks are a uniformly random permutation of that set, so per
     group ``E[C(k_l, j)] = 1/j!``, across the ``L`` groups ``E[C(k, j)] <= L^j / j!``, and Markov's
     inequality on ``C(k, j)`` gives ``P[k >= j] <= L^j / j!``. Ranks, not positions: a unit added or
     removed (a trap dropped) shifts every later position but no other unit's rank.
  2. *Traps.* For each of the copy's trap codes ``t`` (an isotropic Gaussian vector of dimension ``d``),
     the largest ``|cos|`` with any suspect unit's incoming parameters. For one fixed unit ``|cos|`` of
     an isotropic ``t`` has the exact tail ``I_{1-x^2}((d-1)/2, 1/2)``; a union bound over the suspect's
     ``m'`` units gives a valid p-value per trap, independent across traps (independent codes), combined
     with Fisher's method (valid for conservative p-values).
  3. *Values* (only for a registry with ``value_strength > 0``): each copy also carries the weight
     watermark of :mod:`nitrovault.watermark.weights` under a key derived from its secret, embedded in the
     reference's coordinates before hardening, in the FFN layers' incoming weights. It is the one part
     that is not function preserving (its cost is measured in docs/hardening.md) and the one part that
     survives a thief who re-aligns the copy to a relative of the base and drops the leftover units: the
     exact binomial test of :func:`~nitrovault.watermark.weights.detect_weight_mark` on the re-aligned
     suspect.

  The copy's p-value is the number of tests times their smallest p-value (Bonferroni), the reported one
  that times the number of registered copies (Bonferroni again). The copy with the smallest p-value is
  named when it is at most the threshold (default ``1e-6``).

The order test survives everything that keeps units in order (fine-tuning, pruning, noise, quantisation,
units added or removed) and dies with a re-permutation; the trap test survives re-permutation and
rescaling (fine-tuning moves a trap's incoming weights only slowly: their gradient is zero until the
trap's zero outgoing weights have moved) and dies when the trap units are found and removed. A thief
holding the base model (or a relative) can re-align the copy to it and drop the leftover units, which
removes both: only the value mark survives that. docs/hardening.md has the measured sweep.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy.special import betainc
from scipy.stats import chi2

from nitrovault.errors import ConfigError
from nitrovault.files import write_private
from nitrovault.owner.harden import (
    DEFAULT_TRAPS,
    SCALE_RANGE,
    GroupAlignment,
    GroupPlan,
    HardenReport,
    Model,
    align,
    harden,
    key_id,
    model_digest,
    plan,
)
from nitrovault.watermark.keys import WatermarkKeys, derive_watermark_keys
from nitrovault.watermark.weights import detect_weight_mark, embed_weight_mark

REGISTRY_FORMAT = "nitrovault-fingerprint-registry"
REGISTRY_VERSION = 1
DEFAULT_THRESHOLD = 1e-6
#: correlation at or above which a matched pair counts for the order test
MIN_MATCH = 0.5
#: the value mark's bits (the weight watermark's default)
VALUE_BITS = 64
COPY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_SALT = b"nitrovault/harden/v1"
_COPY_INFO = b"nitrovault/harden/v1/copy\x00"
#: p-values below this are reported as it (float64 underflow; a clipped p-value is larger: conservative)
P_FLOOR = 1e-300


def copy_secret(master: bytes, copy_id: str) -> bytes:
    """The hardening secret of ``copy_id`` (module docstring)."""
    if len(master) < 32:
        raise ConfigError("a hardening master key must be at least 32 bytes")
    if not COPY_ID.fullmatch(copy_id):
        raise ConfigError(f"copy id {copy_id!r} must be 1-128 of [A-Za-z0-9._:@-], starting alphanumeric")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_COPY_INFO + copy_id.encode())
    return hkdf.derive(master)


@dataclass(frozen=True)
class Registry:
    """The owner's record of the hardened copies of one reference model (module docstring)."""

    key_id: str
    reference: str
    architecture: str
    traps: int = DEFAULT_TRAPS
    scale_range: float = SCALE_RANGE
    #: strength of each copy's value mark (0: none, the copies compute exactly the reference's function)
    value_strength: float = 0.0
    copies: tuple[str, ...] = ()

    @classmethod
    def new(cls, master: bytes, reference: Model, *, traps: int = DEFAULT_TRAPS,
            scale_range: float = SCALE_RANGE, value_strength: float = 0.0) -> Registry:
        if not 0 <= value_strength <= 10:
            raise ConfigError("the value mark's strength must be in [0, 10] (0: no value mark)")
        return cls(key_id(master), model_digest(reference), reference.architecture, traps, scale_range,
                   value_strength)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ConfigError(f"cannot read the registry {path}: {type(err).__name__}") from None
        if not isinstance(raw, dict) or raw.get("format") != REGISTRY_FORMAT:
            raise ConfigError(f"{path} is not a nitrovault fingerprint registry")
        if raw.get("version") != REGISTRY_VERSION:
            raise ConfigError(f"{path} has registry version {raw.get('version')!r}; this build reads "
                              f"{REGISTRY_VERSION}")
        try:
            params, copies = raw["params"], raw["copies"]
            registry = cls(key_id=str(raw["key_id"]), reference=str(raw["reference"]["sha256"]),
                           architecture=str(raw["reference"]["architecture"]), traps=int(params["traps"]),
                           scale_range=float(params["scale_range"]),
                           value_strength=float(params.get("value_strength", 0.0)),
                           copies=tuple(str(c["copy_id"]) for c in copies))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path} is a corrupt fingerprint registry (missing or mistyped fields)"
                              ) from None
        if len(set(registry.copies)) != len(registry.copies) or not all(
                COPY_ID.fullmatch(c) for c in registry.copies):
            raise ConfigError(f"{path} is a corrupt fingerprint registry (duplicate or malformed copy ids)")
        return registry

    def to_json(self) -> str:
        return json.dumps({
            "format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "key_id": self.key_id,
            "reference": {"sha256": self.reference, "architecture": self.architecture},
            "params": {"traps": self.traps, "scale_range": self.scale_range,
                       "value_strength": self.value_strength},
            "copies": [{"copy_id": c, "derivation": "HKDF-SHA256(master, salt='nitrovault/harden/v1', "
                                                    f"info='nitrovault/harden/v1/copy' 0x00 '{c}')"}
                       for c in self.copies],
        }, indent=2) + "\n"

    def save(self, path: Path) -> None:
        write_private(path, self.to_json())

    def with_copy(self, copy_id: str) -> Registry:
        if copy_id in self.copies:
            raise ConfigError(f"copy id {copy_id!r} is already in the registry")
        return replace(self, copies=(*self.copies, copy_id))

    def check(self, master: bytes, reference: Model) -> None:
        """:class:`ConfigError` unless ``master`` and ``reference`` are this registry's."""
        if key_id(master) != self.key_id:
            raise ConfigError("the key file is not the master key this registry's copies were hardened with")
        if reference.architecture != self.architecture or model_digest(reference) != self.reference:
            raise ConfigError("the reference is not the model this registry's copies were hardened from")


def harden_copy(reference: Model, master: bytes, registry: Registry,
                copy_id: str) -> tuple[Model, HardenReport]:
    """``reference`` hardened as copy ``copy_id`` of ``registry`` (whose parameters it uses), with the
    copy's value mark first when the registry asks for one."""
    registry.check(master, reference)
    secret = copy_secret(master, copy_id)
    if registry.value_strength > 0:
        marked, _ = embed_weight_mark(reference.tensors, value_keys(secret), bits=VALUE_BITS,
                                      strength=registry.value_strength, layers=value_layers(reference))
        reference = replace(reference, tensors=marked)
    return harden(reference, secret, traps=registry.traps, scale_range=registry.scale_range)


def value_layers(reference: Model) -> list[str]:
    """The tensors that carry a copy's value mark: the FFN layers' incoming weights."""
    return sorted({p.tensor for g in reference.groups() if g.takes_traps for p in g.code_parts})


def value_keys(secret: bytes) -> WatermarkKeys:
    """The weight-watermark keys of a copy's value mark (from the copy's secret)."""
    return derive_watermark_keys(secret, "nitrovault/harden/v1/value-mark")


@dataclass(frozen=True)
class CopyScore:
    copy_id: str
    #: well-matched reference units with the rank the copy's secret order gave them
    order_agreeing: int
    order_p: float
    #: traps found (their own p-value at most 1e-3), of the copy's traps
    traps_found: int
    traps: int
    traps_p: float
    #: ``min(1, copies * tests * min(p-values))``
    p_value: float
    #: the value mark's p-value (1.0 when the registry has none)
    values_p: float = 1.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Identification:
    copy_id: str | None
    p_value: float
    threshold: float
    units: int
    #: mean correlation of the matched unit pairs (how much of the reference the suspect still is)
    match_similarity: float
    scores: tuple[CopyScore, ...]

    def as_dict(self) -> dict[str, object]:
        best = sorted(self.scores, key=lambda s: s.p_value)
        return {"copy_id": self.copy_id, "p_value": self.p_value, "threshold": self.threshold,
                "units": self.units, "match_similarity": self.match_similarity,
                "copies_tested": len(self.scores), "best": [s.as_dict() for s in best[:5]]}


def _order_p(agreeing: int, groups: int) -> float:
    """``P[k >= agreeing] <= L^k / k!`` for ``L`` groups (module docstring), at most 1."""
    if agreeing == 0:
        return 1.0
    log_p = agreeing * math.log(groups) - math.lgamma(agreeing + 1)
    return max(P_FLOOR, math.exp(min(0.0, log_p)))


def _cos_tail(x: np.ndarray, dim: int) -> np.ndarray:
    """``P[|cos| >= x]`` for one fixed vector and an isotropic one in ``dim`` dimensions."""
    return np.asarray(betainc((dim - 1) / 2, 0.5, np.clip(1 - np.square(x), 0.0, 1.0)))


def trap_p_values(alignment: GroupAlignment, group_plan: GroupPlan) -> np.ndarray:
    """One p-value per trap of ``group_plan`` against the suspect's units (module docstring)."""
    if not group_plan.traps:
        return np.ones(0)
    codes = np.stack([np.concatenate(c) for c in group_plan.codes])
    if alignment.directions.shape[1] != codes.shape[1]:
        raise ConfigError("the suspect's units do not have the reference's inputs")
    cos = np.abs(codes @ alignment.directions.T) / np.linalg.norm(codes, axis=1)[:, None]
    tail = _cos_tail(cos.max(axis=1), codes.shape[1])
    return np.asarray(np.clip(alignment.suspect_units * tail, P_FLOOR, 1.0))


def _ranks(values: np.ndarray) -> np.ndarray:
    return np.asarray(np.argsort(np.argsort(values, kind="stable"), kind="stable"))


def order_agreement(alignment: GroupAlignment, group_plan: GroupPlan) -> int:
    """Well-matched reference units ranked alike by the suspect's order and the copy's (module docstring)."""
    kept = (alignment.assignment >= 0) & (alignment.similarity >= MIN_MATCH)
    if not kept.any():
        return 0
    return int(np.sum(_ranks(alignment.assignment[kept]) == _ranks(group_plan.positions[kept])))


def score_copy(copy_id: str, plans: Sequence[GroupPlan], alignments: Sequence[GroupAlignment],
               copies: int, values_p: float | None = None) -> CopyScore:
    """The tests of one copy (``values_p``: the value mark's p-value, when the registry has one)."""
    pairs = list(zip(alignments, plans, strict=True))
    agreeing = sum(order_agreement(a, p) for a, p in pairs)
    groups = sum(1 for a, _ in pairs if np.any((a.assignment >= 0) & (a.similarity >= MIN_MATCH)))
    trap_p = np.concatenate([trap_p_values(a, p) for a, p in pairs])
    traps_p = float(chi2.sf(-2 * np.sum(np.log(trap_p)), 2 * len(trap_p))) if len(trap_p) else 1.0
    traps_p = max(traps_p, P_FLOOR)
    order_p = _order_p(agreeing, max(groups, 1))
    tested = [order_p, traps_p] + ([] if values_p is None else [max(values_p, P_FLOOR)])
    p = min(1.0, copies * len(tested) * min(tested))
    return CopyScore(copy_id, agreeing, order_p, int(np.sum(trap_p <= 1e-3)), len(trap_p), traps_p, p,
                     1.0 if values_p is None else values_p)


def identify(suspect: Mapping[str, np.ndarray], reference: Model, registry: Registry, master: bytes, *,
             threshold: float = DEFAULT_THRESHOLD) -> Identification:
    """Which registered copy ``suspect`` is (or none): module docstring."""
    if not registry.copies:
        raise ConfigError("the registry holds no copies")
    if not 0 < threshold < 1:
        raise ConfigError("the threshold must be in (0, 1)")
    registry.check(master, reference)
    aligned, alignments = align(suspect, reference)
    groups = reference.groups()
    layers = value_layers(reference)

    def score(copy_id: str) -> CopyScore:
        secret = copy_secret(master, copy_id)
        plans = plan(secret, groups, reference.tensors, traps=registry.traps,
                     scale_range=registry.scale_range)
        values_p = None if registry.value_strength <= 0 else detect_weight_mark(
            aligned, value_keys(secret), bits=VALUE_BITS, layers=layers).p_value
        return score_copy(copy_id, plans, alignments, len(registry.copies), values_p)

    scores = tuple(score(c) for c in registry.copies)
    best = min(scores, key=lambda s: s.p_value)
    similarity = float(np.mean(np.concatenate([a.similarity for a in alignments])))
    return Identification(
        copy_id=best.copy_id if best.p_value <= threshold else None, p_value=best.p_value,
        threshold=threshold, units=sum(len(a.assignment) for a in alignments),
        match_similarity=similarity, scores=scores)
