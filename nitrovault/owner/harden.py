"""Function-preserving model hardening: a secret permutation of hidden units and attention heads, positive
rescaling where the activation allows it, and "trap" units that carry a code (docs/hardening.md).

A served model's hidden units have symmetries: permuting the units of a layer (the rows of its incoming
weights and biases, the columns of its outgoing weights) or the heads of an attention block (their
query/key/value rows and output-projection columns), multiplying a unit's incoming weights by ``c > 0`` and
its outgoing ones by ``1/c`` where the activation is positively homogeneous (ReLU; the linear ``up``
branch of a SwiGLU; a head's values against its output columns, its queries against its keys), and
adding a unit whose outgoing weights are zero all leave the function unchanged. :func:`harden` applies
all three under a secret, so that a copy no longer lines up unit for unit with the model it came from,
and each copy hardened under its own secret (:mod:`nitrovault.owner.fingerprint`) carries a different,
provable trace.

The model is described by :class:`UnitGroup` s (one per FFN layer, one per attention block), each a list of
:class:`Part` s: where in which tensor a unit's parameters sit. :func:`unit_groups` builds them for the
architectures we serve (``generic:mlp-classifier``, ``sentence-embedding`` (BERT/MiniLM),
``causal-lm:gpt2``, ``causal-lm:llama``), read from the model's own ``nitrovault.handler`` and
``nitrovault.config`` metadata. :func:`align` is the inverse the owner runs on a suspect: match its units
to the reference's (Hungarian assignment on per-part standardised parameters, ``scipy``), undo the
rescaling, and keep every suspect unit's incoming parameters for the trap test.

Everything here is written by hand because no library transforms safetensors weights by their symmetries;
the assignment itself is ``scipy.optimize.linear_sum_assignment`` and the randomness a ChaCha20 keystream
(:func:`nitrovault.watermark.keys.keystream`), so a plan made today is replayed by any later numpy.

Invariants: :func:`harden` returns new arrays (its input is not modified) and leaves every tensor outside
the unit groups (embeddings, layer norms, extras, integer buffers) as the same object; trap units are
appended before rescaling and permutation, so their codes are defined in the reference's coordinates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from nitrovault.errors import ConfigError
from nitrovault.watermark.keys import keystream

HANDLER_KEY = "nitrovault.handler"
CONFIG_KEY = "nitrovault.config"
#: trap units added to every FFN layer by default
DEFAULT_TRAPS = 4
#: positive rescaling factors are drawn log-uniformly from [1/SCALE_RANGE, SCALE_RANGE]
SCALE_RANGE = 2.0
ARCHITECTURES = ("generic:mlp-classifier", "sentence-embedding", "causal-lm:gpt2", "causal-lm:llama")

Role = Literal["in", "bias", "out"]
Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Part:
    """Where one unit's parameters sit in one tensor: unit ``i`` is the block
    ``[offset + i*width, offset + (i+1)*width)`` along ``axis``.

    ``in``: incoming weights (a trap gets its code here); ``bias``: incoming bias (a trap gets a code
    value too); ``out``: outgoing weights (zero for a trap). ``stable``: the tensor's other axes are in
    the reference's order when the group is aligned (true for everything but an MLP's outgoing weights,
    whose rows are the next layer's units), so the part can be used to match units.
    """

    tensor: str
    axis: int
    role: Role
    width: int = 1
    offset: int = 0
    stable: bool = True


@dataclass(frozen=True)
class Rescale:
    """Units' ``up`` parts may be multiplied by ``c > 0`` if their ``down`` parts are divided by it."""

    up: tuple[Part, ...]
    down: tuple[Part, ...]


@dataclass(frozen=True)
class UnitGroup:
    """The interchangeable units of one layer (FFN units) or attention block (heads)."""

    name: str
    units: int
    parts: tuple[Part, ...]
    rescales: tuple[Rescale, ...] = ()
    #: the config entry holding the unit count (``("intermediate_size",)``, ``("hidden", 0)``), or None:
    #: the count is fixed by the architecture (heads) and no trap units can be added
    config_path: tuple[str | int, ...] | None = None

    @property
    def takes_traps(self) -> bool:
        return self.config_path is not None

    @property
    def code_parts(self) -> tuple[Part, ...]:
        """The 2-D incoming parts: a trap's code, and what the trap test compares."""
        return tuple(p for p in self.parts if p.role == "in")


@dataclass(frozen=True)
class Model:
    """A model as hardening sees it: its tensors, its architecture and its decoded config."""

    tensors: dict[str, np.ndarray]
    architecture: str
    config: dict[str, object]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file_parts(cls, tensors: Arrays, metadata: Mapping[str, str]) -> Model:
        architecture = metadata.get(HANDLER_KEY)
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"hardening supports {', '.join(ARCHITECTURES)}; this model's handler is "
                              f"{architecture!r}")
        try:
            config = json.loads(metadata.get(CONFIG_KEY, ""))
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise ConfigError(f"the model's {CONFIG_KEY} metadata is not a JSON object")
        return cls(dict(tensors), architecture, config, dict(metadata))

    def groups(self) -> list[UnitGroup]:
        return unit_groups(self.architecture, self.config, self.tensors)

    def file_metadata(self) -> dict[str, str]:
        return {**self.metadata, CONFIG_KEY: json.dumps(self.config)}


# -- architectures ------------------------------------------------------------------------------------


def _int(config: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"the model config's {key!r} must be a positive integer")
    return value


def _mlp(config: Mapping[str, object], tensors: Arrays) -> list[UnitGroup]:
    hidden = config.get("hidden")
    if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ConfigError("the mlp-classifier config's 'hidden' must be a list of positive integers")
    groups = []
    for i, units in enumerate(hidden):
        w, b, nxt = f"net.{2 * i}.weight", f"net.{2 * i}.bias", f"net.{2 * i + 2}.weight"
        relu_in = (Part(w, 0, "in"), Part(b, 0, "bias"))
        out = Part(nxt, 1, "out", stable=False)
        groups.append(UnitGroup(f"hidden.{i}", units, (*relu_in, out),
                                rescales=(Rescale(relu_in, (out,)),), config_path=("hidden", i)))
    return groups


def _bert(config: Mapping[str, object], tensors: Arrays) -> list[UnitGroup]:
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    width = hidden // heads
    groups = []
    for layer in range(_int(config, "num_hidden_layers")):
        p = f"encoder.layer.{layer}."
        roles: tuple[tuple[str, Role], ...] = (("weight", "in"), ("bias", "bias"))
        q, k, v = (tuple(Part(f"{p}attention.self.{n}.{t}", 0, r, width) for t, r in roles)
                   for n in ("query", "key", "value"))
        o = Part(f"{p}attention.output.dense.weight", 1, "out", width)
        groups.append(UnitGroup(f"layer.{layer}.heads", heads, (*q, *k, *v, o),
                                rescales=(Rescale(v, (o,)), Rescale(q, k))))
        ffn_in = (Part(f"{p}intermediate.dense.weight", 0, "in"),
                  Part(f"{p}intermediate.dense.bias", 0, "bias"))
        groups.append(UnitGroup(f"layer.{layer}.ffn", _int(config, "intermediate_size"),
                                (*ffn_in, Part(f"{p}output.dense.weight", 1, "out")),
                                config_path=("intermediate_size",)))
    return groups


def _gpt2(config: Mapping[str, object], tensors: Arrays) -> list[UnitGroup]:
    embd, heads = _int(config, "n_embd"), _int(config, "n_head")
    width = embd // heads
    inner = config.get("n_inner") or 4 * embd
    if not isinstance(inner, int):
        raise ConfigError("the model config's 'n_inner' must be an integer")
    groups = []
    for layer in range(_int(config, "n_layer")):
        p = f"transformer.h.{layer}."
        roles: tuple[tuple[str, int, Role], ...] = (("weight", 1, "in"), ("bias", 0, "bias"))
        q, k, v = (tuple(Part(f"{p}attn.c_attn.{t}", ax, r, width, s * embd) for t, ax, r in roles)
                   for s in range(3))
        o = Part(f"{p}attn.c_proj.weight", 0, "out", width)
        groups.append(UnitGroup(f"layer.{layer}.heads", heads, (*q, *k, *v, o),
                                rescales=(Rescale(v, (o,)), Rescale(q, k))))
        groups.append(UnitGroup(f"layer.{layer}.ffn", inner,
                                (Part(f"{p}mlp.c_fc.weight", 1, "in"), Part(f"{p}mlp.c_fc.bias", 0, "bias"),
                                 Part(f"{p}mlp.c_proj.weight", 0, "out")), config_path=("n_inner",)))
    return groups


def _llama(config: Mapping[str, object], tensors: Arrays) -> list[UnitGroup]:
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    kv = _int(config, "num_key_value_heads", heads)
    width = _int(config, "head_dim", hidden // heads) if config.get("head_dim") else hidden // heads
    if heads % kv:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    share = heads // kv  # query heads per key/value head: they move together
    groups = []
    for layer in range(_int(config, "num_hidden_layers")):
        p = f"model.layers.{layer}."

        def proj(name: str, w: int, p: str = p) -> tuple[Part, ...]:
            parts = [Part(f"{p}self_attn.{name}.weight", 0, "in", w)]
            if f"{p}self_attn.{name}.bias" in tensors:
                parts.append(Part(f"{p}self_attn.{name}.bias", 0, "bias", w))
            return tuple(parts)

        q, k, v = proj("q_proj", share * width), proj("k_proj", width), proj("v_proj", width)
        o = Part(f"{p}self_attn.o_proj.weight", 1, "out", share * width)
        groups.append(UnitGroup(f"layer.{layer}.heads", kv, (*q, *k, *v, o),
                                rescales=(Rescale(v, (o,)), Rescale(q, k))))
        gate, up = Part(f"{p}mlp.gate_proj.weight", 0, "in"), Part(f"{p}mlp.up_proj.weight", 0, "in")
        down = Part(f"{p}mlp.down_proj.weight", 1, "out")
        groups.append(UnitGroup(f"layer.{layer}.ffn", _int(config, "intermediate_size"), (gate, up, down),
                                rescales=(Rescale((up,), (down,)),), config_path=("intermediate_size",)))
    return groups


_BUILDERS = {"generic:mlp-classifier": _mlp, "sentence-embedding": _bert,
             "causal-lm:gpt2": _gpt2, "causal-lm:llama": _llama}


def unit_groups(architecture: str, config: Mapping[str, object], tensors: Arrays) -> list[UnitGroup]:
    """The unit groups of a model, checked against its tensors (every part exists, is floating point and
    has room for its units); :class:`ConfigError` naming the first mismatch."""
    builder = _BUILDERS.get(architecture)
    if builder is None:
        raise ConfigError(f"hardening supports {', '.join(ARCHITECTURES)}; not {architecture!r}")
    groups = builder(config, tensors)
    for group in groups:
        for part in group.parts:
            t = tensors.get(part.tensor)
            if t is None:
                raise ConfigError(f"the model has no tensor {part.tensor!r} ({architecture})")
            if not np.issubdtype(t.dtype, np.floating) or part.axis >= t.ndim:
                raise ConfigError(f"tensor {part.tensor!r} is not a floating tensor of the expected rank")
            end = part.offset + group.units * part.width
            exact = part.offset == 0 and group.takes_traps  # a trap-capable group fills its axis
            if t.shape[part.axis] < end or (exact and t.shape[part.axis] != end):
                raise ConfigError(f"tensor {part.tensor!r} has {t.shape[part.axis]} entries along axis "
                                  f"{part.axis}; the config implies {end}")
    return groups


# -- block primitives ------------------------------------------------------------------------------------


def blocks(t: np.ndarray, part: Part, units: int) -> np.ndarray:
    """The part's unit blocks as ``[units, width, *other axes]`` (a view when possible)."""
    moved = np.moveaxis(t, part.axis, 0)
    segment = moved[part.offset:part.offset + units * part.width]
    return segment.reshape(units, part.width, *moved.shape[1:])


def _rebuild(t: np.ndarray, part: Part, units: int, new_blocks: np.ndarray) -> np.ndarray:
    moved = np.moveaxis(t, part.axis, 0)
    new = new_blocks.reshape(-1, *moved.shape[1:]).astype(t.dtype, copy=False)
    joined = np.concatenate([moved[:part.offset], new, moved[part.offset + units * part.width:]])
    return np.moveaxis(joined, 0, part.axis)


def reorder(tensors: dict[str, np.ndarray], group: UnitGroup, units: int, order: np.ndarray) -> None:
    """Make ``tensors`` (in place, new arrays) hold unit ``order[j]`` at position ``j`` in every part of
    ``group`` (``-1``: a zero unit). Parts of one tensor are rebuilt from the highest offset down, so a
    part that changes size does not move another's offset."""
    order = np.asarray(order)
    for part in sorted(group.parts, key=lambda p: (p.tensor, -p.offset)):
        old = blocks(tensors[part.tensor], part, units)
        new = np.zeros((len(order), *old.shape[1:]), dtype=np.float64)
        keep = order >= 0
        new[keep] = old[order[keep]]
        tensors[part.tensor] = _rebuild(tensors[part.tensor], part, units, new)


def _scale(tensors: dict[str, np.ndarray], parts: Sequence[Part], units: int, factors: np.ndarray) -> None:
    for part in parts:
        b = blocks(tensors[part.tensor], part, units).astype(np.float64)
        b *= factors.reshape(-1, *([1] * (b.ndim - 1)))
        tensors[part.tensor] = _rebuild(tensors[part.tensor], part, units, b)


def unit_vectors(tensors: Arrays, parts: Sequence[Part], units: int) -> list[np.ndarray]:
    """Per part, every unit's parameters flattened: ``[units, size]`` float64."""
    return [blocks(tensors[p.tensor], p, units).reshape(units, -1).astype(np.float64) for p in parts]


# -- the secret plan ---------------------------------------------------------------------------------------


def _uniform(key: bytes, label: str, n: int) -> np.ndarray:
    raw = np.frombuffer(keystream(key, label.encode(), 8 * n), dtype="<u8")
    return np.asarray((raw >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _gaussian(key: bytes, label: str, n: int) -> np.ndarray:
    u = _uniform(key, label, 2 * n)
    return np.asarray(np.sqrt(-2 * np.log1p(-u[:n])) * np.cos(2 * np.pi * u[n:]))


@dataclass(frozen=True)
class GroupPlan:
    """What hardening does to one group: ``order[j]`` is the (trap-extended) unit put at position ``j``;
    ``scales[r]`` the factors of rescale ``r`` (one per extended unit); ``codes[k]`` trap ``k``'s
    incoming parameters per code part (reference coordinates, unit RMS)."""

    units: int
    traps: int
    order: np.ndarray
    scales: tuple[np.ndarray, ...]
    codes: tuple[tuple[np.ndarray, ...], ...]

    @property
    def positions(self) -> np.ndarray:
        """Where each reference unit ends up in the hardened copy."""
        return np.asarray(np.argsort(self.order)[: self.units])


def plan(secret: bytes, groups: Sequence[UnitGroup], tensors: Arrays, *, traps: int = DEFAULT_TRAPS,
         scale_range: float = SCALE_RANGE) -> list[GroupPlan]:
    """The secret transformation of every group, replayable from ``secret`` and the reference's shapes."""
    if len(secret) < 32:
        raise ConfigError("a hardening secret must be at least 32 bytes")
    if not 0 <= traps <= 1024 or not 1.0 <= scale_range <= 16.0:
        raise ConfigError("traps must be in [0, 1024] and the scale range in [1, 16]")
    plans = []
    for group in groups:
        n_traps = traps if group.takes_traps else 0
        total = group.units + n_traps
        label = f"{group.name}|{group.units}|{n_traps}"
        order = np.argsort(_uniform(secret, f"order|{label}", total), kind="stable")
        span = np.log(scale_range)
        scales = tuple(np.exp(span * (2 * _uniform(secret, f"scale|{r}|{label}", total) - 1))
                       for r in range(len(group.rescales)))
        codes = tuple(
            tuple(_gaussian(secret, f"trap|{k}|{p.tensor}|{label}",
                            int(np.prod(blocks(tensors[p.tensor], p, group.units).shape[1:])))
                  for p in group.code_parts)
            for k in range(n_traps))
        plans.append(GroupPlan(group.units, n_traps, order, scales, codes))
    return plans


def _rms(t: np.ndarray) -> float:
    value = float(np.sqrt(np.mean(np.square(t, dtype=np.float64)))) if t.size else 0.0
    return value if value > 0 else 1.0


def _set_config(config: dict[str, object], path: tuple[str | int, ...], value: int) -> None:
    target: object = config
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]


@dataclass(frozen=True)
class HardenReport:
    architecture: str
    groups: int
    permuted_units: int
    rescaled_groups: int
    trap_units: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def harden(model: Model, secret: bytes, *, traps: int = DEFAULT_TRAPS,
           scale_range: float = SCALE_RANGE) -> tuple[Model, HardenReport]:
    """``model`` transformed under ``secret``: the same function, other units (module docstring)."""
    groups = model.groups()
    plans = plan(secret, groups, model.tensors, traps=traps, scale_range=scale_range)
    tensors = dict(model.tensors)
    config = json.loads(json.dumps(model.config))
    # 1. traps, appended in reference coordinates (codes scaled to the part's RMS); last group first, so a
    #    trap's code spans the reference's inputs and an earlier group's traps then add zero inputs to it
    for group, p in reversed(list(zip(groups, plans, strict=True))):
        if not p.traps:
            continue
        reorder(tensors, group, group.units, np.concatenate([np.arange(group.units), -np.ones(p.traps, int)]))
        total = group.units + p.traps
        for part in group.parts:
            if part.role == "out":
                continue
            b = blocks(tensors[part.tensor], part, total).astype(np.float64)
            rms = _rms(b[: group.units])
            for k in range(p.traps):
                if part.role == "in":
                    code = p.codes[k][group.code_parts.index(part)]
                else:
                    code = _gaussian(secret, f"trap-bias|{k}|{part.tensor}|{group.name}", b[0].size)
                b[group.units + k] = (rms * code).reshape(b.shape[1:])
            tensors[part.tensor] = _rebuild(tensors[part.tensor], part, total, b)
        assert group.config_path is not None
        _set_config(config, group.config_path, total)
    # 2. positive rescaling, 3. permutation (all groups' traps exist by now)
    for group, p in zip(groups, plans, strict=True):
        total = group.units + p.traps
        for rescale, factors in zip(group.rescales, p.scales, strict=True):
            _scale(tensors, rescale.up, total, factors)
            _scale(tensors, rescale.down, total, 1 / factors)
        reorder(tensors, group, total, p.order)
    report = HardenReport(
        architecture=model.architecture, groups=len(groups),
        permuted_units=sum(g.units for g in groups),
        rescaled_groups=sum(1 for g in groups if g.rescales), trap_units=sum(p.traps for p in plans))
    return Model(tensors, model.architecture, config, model.metadata), report


# -- alignment against a reference -----------------------------------------------------------------------


def _standardised(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.where(norm > 0, norm, 1.0))


def _family(part: Part) -> tuple[str, int]:
    """A weight and its bias are one family (they are rescaled together)."""
    return part.tensor.removesuffix(".weight").removesuffix(".bias"), part.offset


def _features(tensors: Arrays, group: UnitGroup, units: int) -> np.ndarray:
    """Every unit's stable parameters, each family (a weight with its bias) standardised on its own, so a
    rescaled family still matches, concatenated and divided by the square root of the family count
    (rows of unit norm)."""
    families: dict[tuple[str, int], list[np.ndarray]] = {}
    parts = [p for p in group.parts if p.stable]
    for part, vectors in zip(parts, unit_vectors(tensors, parts, units), strict=True):
        families.setdefault(_family(part), []).append(vectors)
    standardised = [_standardised(np.hstack(v)) for v in families.values()]
    return np.asarray(np.hstack(standardised) / np.sqrt(len(standardised)))


@dataclass(frozen=True)
class GroupAlignment:
    """The suspect's units of one group against the reference's."""

    #: ``assignment[i]``: the suspect unit matched to reference unit ``i`` (``-1``: none left)
    assignment: np.ndarray
    #: correlation of each matched pair (what the match is worth)
    similarity: np.ndarray
    #: every suspect unit's incoming parameters (the code parts, concatenated) as a unit vector, with the
    #: inputs already re-aligned (a zero unit stays zero)
    directions: np.ndarray
    suspect_units: int


def suspect_units(group: UnitGroup, reference: Arrays, suspect: Arrays) -> int:
    """The suspect's unit count for ``group`` (trap-capable groups may have added or lost units), checked
    against every part; :class:`ConfigError` when its shapes are not the reference's architecture."""
    units = group.units
    if group.takes_traps:
        first = group.parts[0]
        units = suspect[first.tensor].shape[first.axis] // first.width if first.tensor in suspect else 0
    for part in group.parts:
        t, ref = suspect.get(part.tensor), reference[part.tensor]
        if t is None:
            raise ConfigError(f"the suspect has no tensor {part.tensor!r}: not this architecture")
        other = [s for a, s in enumerate(t.shape) if a != part.axis]
        expected = [s for a, s in enumerate(ref.shape) if a != part.axis]
        if t.ndim != ref.ndim or units < 1 or t.shape[part.axis] < part.offset + units * part.width:
            raise ConfigError(f"the suspect's {part.tensor!r} has shape {list(t.shape)}: not this "
                              "architecture")
        if other != expected and part.stable:
            raise ConfigError(f"the suspect's {part.tensor!r} has shape {list(t.shape)}; the reference's "
                              f"is {list(ref.shape)}")
    return units


def align(suspect: Arrays, reference: Model) -> tuple[dict[str, np.ndarray], list[GroupAlignment]]:
    """Re-align ``suspect``'s units to ``reference``'s, group by group in order (so each group's
    incoming parameters are compared in the reference's input order), undoing positive rescaling.

    Returns the aligned tensors (the reference's unit counts) and one :class:`GroupAlignment` per group.
    """
    out = {k: np.asarray(v) for k, v in suspect.items()}
    alignments = []
    for group in reference.groups():
        units = suspect_units(group, reference.tensors, out)
        incoming = np.hstack([np.zeros((units, 0)), *unit_vectors(out, group.code_parts, units)])
        norms = np.linalg.norm(incoming, axis=1, keepdims=True)
        directions = incoming / np.where(norms > 0, norms, 1.0)
        ref_f = _features(reference.tensors, group, group.units)
        sus_f = _features(out, group, units)
        similarity = ref_f @ sus_f.T
        rows, cols = linear_sum_assignment(-similarity)
        assignment = -np.ones(group.units, dtype=np.int64)
        assignment[rows] = cols
        matched = np.zeros(group.units)
        matched[rows] = similarity[rows, cols]
        reorder(out, group, units, assignment)
        for rescale in group.rescales:
            ref_norm = _norms(reference.tensors, rescale.up, group.units)
            sus_norm = _norms(out, rescale.up, group.units)
            usable = (ref_norm > 0) & (sus_norm > 0)
            factors = np.where(usable, sus_norm / np.where(usable, ref_norm, 1), 1)
            _scale(out, rescale.up, group.units, 1 / factors)
            _scale(out, rescale.down, group.units, factors)
        alignments.append(GroupAlignment(assignment, matched, directions, units))
    return out, alignments


def _norms(tensors: Arrays, parts: Sequence[Part], units: int) -> np.ndarray:
    return np.asarray(np.sqrt(sum(np.sum(np.square(v), axis=1) for v in unit_vectors(tensors, parts, units))))


def alignment_score(suspect: Arrays, reference: Model) -> float:
    """How well ``suspect`` lines up unit for unit with ``reference`` *as it is* (no matching): the mean
    over every unit of the correlation of unit ``i``'s stable parameters in both (1.0 for the reference
    itself; near 0 for a hardened copy). Diffing, merging and transplanting layers assume this alignment."""
    scores: list[np.ndarray] = []
    for group in reference.groups():
        # as it is: another group's added units along a part's other axes are cut off, not matched
        cropped = dict(suspect)
        for part in group.parts:
            ref_shape = reference.tensors[part.tensor].shape
            if part.tensor in suspect and suspect[part.tensor].ndim == len(ref_shape):
                cropped[part.tensor] = suspect[part.tensor][tuple(
                    slice(None) if axis == part.axis else slice(0, size)
                    for axis, size in enumerate(ref_shape))]
        units = suspect_units(group, reference.tensors, cropped)
        n = min(units, group.units)
        ref_f = _features(reference.tensors, group, group.units)[:n]
        sus_f = _features(cropped, group, units)[:n]
        scores.append(np.sum(ref_f * sus_f, axis=1))
    return float(np.mean(np.concatenate(scores)))


def model_digest(model: Model) -> str:
    """SHA-256 over the unit groups' tensors (names, shapes, float32 bytes) and the architecture: names
    the reference a registry's copies were hardened from."""
    h = hashlib.sha256(model.architecture.encode() + b"\x00")
    names = sorted({p.tensor for g in model.groups() for p in g.parts})
    for name in names:
        t = np.ascontiguousarray(model.tensors[name], dtype="<f4")
        h.update(f"{name}:{'x'.join(map(str, t.shape))}\x00".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def key_id(secret: bytes) -> str:
    """A public name of a hardening master key (HMAC-SHA256 of a fixed label, 16 hex digits)."""
    return hmac.new(secret, b"nitrovault/harden/v1/key-id", hashlib.sha256).hexdigest()[:16]
