"""Model-extraction detection per subject: PRADA plus simpler signals, with bounded state.

Signals (each computed per subject, from the inputs it sends and the labels the model gave them):

``prada``
    Juuti et al. 2019, "PRADA: Protecting against DNN Model Stealing Attacks" (Algorithm 1). For each
    query ``x`` with predicted class ``c``: ``d = min dist(x, G_c)`` over the class's *growing set*
    ``G_c``; ``d`` is appended to the distance list ``D``; if ``d > T_c`` then ``x`` joins ``G_c`` and
    ``T_c = max(T_c, mean(D_Gc) - std(D_Gc))`` (``D_Gc``: the distances that admitted members of
    ``G_c``). Once ``|D| >= min_samples``, Shapiro-Wilk's ``W`` of ``D`` is computed
    (:func:`scipy.stats.shapiro`); ``W < threshold`` (0.9 in the paper) is an alarm. Natural queries
    give roughly normal minimum distances; synthetic ones (random points, small perturbations around
    a few seeds as in Jacobian augmentation) do not. PRADA is known to miss thieves that query with
    natural data from a similar distribution (e.g. KnockoffNets with a natural pool), hence:
``volume``
    more than ``volume_max`` queries within ``volume_window_s`` seconds.
``duplicates``
    near-duplicate bursts: among the last ``dup_window`` queries, the fraction lying within
    ``dup_rel * max(|x|, |y|)`` of an earlier one exceeds ``dup_max_fraction`` (repeating a query to
    average out noise, or probing a decision boundary with tiny steps).
``coverage``
    needs a reference sample of natural inputs (the owner's data, e.g. the training set), cut into
    ``coverage_clusters`` k-means cells (:func:`scipy.cluster.vq.kmeans2`; a query outside the region
    is one farther from its centroid than 99 % of the reference). Over the last ``coverage_window``
    queries, the fraction outside (``novel``) exceeds ``coverage_max_novel``, or the distinct cells
    touched exceed ``coverage_factor`` times the number a benign subject drawing from the reference
    is expected to touch (``E[distinct] = Σ_c 1 - (1 - p_c)^n``). Thieves cover the input space more
    evenly, or more widely (random or out-of-domain inputs), than a natural workload.

Each signal maps to an :class:`Action` in the policy (``record`` < ``throttle`` < ``block``); a query's
action is the most severe among the signals that fire. ``block`` refuses the subject for ``block_s``
seconds (:class:`~nitrovault.errors.PermissionDeniedError`, reason ``extraction-blocked``);
``throttle`` refuses it for ``throttle_s`` seconds (:class:`~nitrovault.errors.QuotaExceededError`,
reason ``extraction-throttled``), after which the next query is checked again. Every
:class:`Decision` carries its evidence (numbers only: never inputs) for the audit log.

Invariants (memory is bounded): per subject at most ``growing_max`` inputs per class in the growing
sets (oldest dropped first), ``distances_max`` distances (most recent), ``dup_window`` inputs,
``coverage_window`` bucket ids and ``volume_max + 1`` timestamps; at most ``max_subjects`` subjects
(least recently seen evicted, and it starts over: forcing that takes ``max_subjects`` valid tokens)
and at most ``max_subjects`` active blocks (kept apart from the state, so evicting state does not
lift a block; when full, the block that ends first is dropped). Stored inputs live in preallocated
ring buffers; a subject whose input width changes starts its growing sets and duplicate window over.
The normality test runs once per observed call, after all its rows. Thread-safe (one lock).

Time (the clock) and randomness (the k-means seed generator) are parameters.

Example::

    monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=x_train)
    monitor.admit("alice")                       # raises while alice is blocked / throttled
    decision = monitor.observe("alice", x, labels)
    audit["extraction"] = decision.to_audit()
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.cluster.vq import kmeans2

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import AccessError, ConfigError, PermissionDeniedError, QuotaExceededError
from nitrovault.subjects import SubjectTable

__all__ = [
    "Action",
    "Decision",
    "ExtractionMonitor",
    "ExtractionPolicy",
    "PradaDetector",
    "PradaResult",
    "SharedAggregates",
    "SharedRefusals",
    "Windows",
]

FloatArray = npt.NDArray[np.float64]
SIGNALS = ("prada", "volume", "duplicates", "coverage")



class Action(enum.IntEnum):
    """What the monitor asks the server to do, by increasing severity."""

    NONE = 0
    RECORD = 1
    THROTTLE = 2
    BLOCK = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Action:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ConfigError(f"unknown action {value!r}; one of none, record, throttle, block") from None


def _distances(feature: str, x: FloatArray, rows: FloatArray) -> FloatArray:
    if feature == "l2":
        return np.asarray(np.linalg.norm(rows - x, axis=1), dtype=np.float64)
    if feature == "l1":
        return np.asarray(np.abs(rows - x).sum(axis=1), dtype=np.float64)
    nx = np.linalg.norm(x) or 1.0
    nr = np.linalg.norm(rows, axis=1)
    return np.asarray(1.0 - rows @ x / (np.where(nr > 0, nr, 1.0) * nx), dtype=np.float64)


@dataclass(frozen=True)
class PradaResult:
    #: Shapiro-Wilk W of the distance list, ``None`` before ``min_samples`` distances
    w: float | None
    #: distances in the list
    n: int
    alarm: bool


class _Ring:
    """The last ``capacity`` rows of one width, in one preallocated array (no per-query stacking)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: FloatArray | None = None
        self.count = 0
        self._next = 0

    def __len__(self) -> int:
        return self.count

    def view(self) -> FloatArray:
        assert self.rows is not None
        return self.rows[: self.count]

    def append(self, v: FloatArray) -> None:
        if self.rows is None or self.rows.shape[1] != v.shape[0]:  # first row, or the width changed
            self.rows = np.empty((self.capacity, v.shape[0]), dtype=np.float64)
            self.count = self._next = 0
        self.rows[self._next] = v
        self._next = (self._next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)


class PradaDetector:
    """One subject's PRADA state (see the module docstring); bounded by ``growing_max`` and
    ``distances_max``. :meth:`add` accounts a query; :meth:`result` runs the normality test (once per
    call of the monitor, not per row: Shapiro-Wilk over up to ``distances_max`` values is the costly
    part); :meth:`observe` does both."""

    def __init__(
        self,
        threshold: float = 0.9,
        min_samples: int = 100,
        feature: str = "l2",
        *,
        growing_max: int = 256,
        distances_max: int = 1000,
        test_every: int = 1,
    ) -> None:
        if feature not in ("l2", "l1", "cosine"):
            raise ConfigError(f"unknown PRADA feature {feature!r}; one of l2, l1, cosine")
        if not 0 < threshold < 1:
            raise ConfigError("PRADA threshold must be within (0, 1)")
        if min_samples < 3 or distances_max < min_samples or growing_max < 1 or test_every < 1:
            raise ConfigError("need 3 <= min_samples <= distances_max, growing_max >= 1, test_every >= 1")
        self.threshold = threshold
        self.test_every = test_every
        self._added = 0  # distances ever added (the list itself saturates at distances_max)
        self._tested_at = -1
        self.min_samples = min_samples
        self.feature = feature
        self._growing_max = growing_max
        self._growing: dict[int, _Ring] = {}
        self._admitted: dict[int, deque[float]] = {}
        self._thresholds: dict[int, float] = {}
        self.distances: deque[float] = deque(maxlen=distances_max)
        self._cached: PradaResult | None = None

    @property
    def stored_inputs(self) -> int:
        return sum(len(g) for g in self._growing.values())

    def add(self, x: npt.ArrayLike, label: int) -> None:
        v = np.asarray(x, dtype=np.float64).ravel()
        growing = self._growing.get(label)
        if growing is None or growing.rows is None or growing.rows.shape[1] != v.shape[0]:
            growing = self._growing[label] = _Ring(self._growing_max)
            self._admitted[label] = deque(maxlen=self._growing_max)
            growing.append(v)
            self._thresholds[label] = 0.0
            return
        d = float(np.min(_distances(self.feature, v, growing.view())))
        self.distances.append(d)
        self._added += 1
        if d > self._thresholds[label]:
            growing.append(v)
            admitted = self._admitted[label]
            admitted.append(d)
            values = np.fromiter(admitted, dtype=np.float64)
            self._thresholds[label] = max(self._thresholds[label], float(values.mean() - values.std()))

    def observe(self, x: npt.ArrayLike, label: int) -> PradaResult:
        self.add(x, label)
        return self.result()

    def result(self) -> PradaResult:
        """The test on the current list; re-run once ``test_every`` distances were added since the last
        run (and at once when the list first reaches ``min_samples``)."""
        n = len(self.distances)
        if n < self.min_samples:
            return PradaResult(w=None, n=n, alarm=False)
        if self._cached is not None and self._added - self._tested_at < self.test_every:
            return self._cached
        self._tested_at = self._added
        values = np.fromiter(self.distances, dtype=np.float64)
        if np.ptp(values) == 0:  # all distances equal (e.g. one query repeated): maximally non-normal
            result = PradaResult(w=0.0, n=n, alarm=True)
        else:
            w = float(stats.shapiro(values).statistic)
            result = PradaResult(w=w, n=n, alarm=w < self.threshold)
        self._cached = result
        return result


_DEFAULT_ACTIONS: Mapping[str, Action] = MappingProxyType(
    {
        "prada": Action.BLOCK,
        "volume": Action.THROTTLE,
        "duplicates": Action.THROTTLE,
        "coverage": Action.THROTTLE,
    }
)


@dataclass(frozen=True)
class ExtractionPolicy:
    """Detector thresholds and the action of each signal (from the measured config)."""

    prada_threshold: float = 0.9  #: Shapiro-Wilk W below which PRADA alarms (paper: 0.9)
    prada_min_samples: int = 100  #: distances needed before the test runs
    prada_feature: str = "l2"  #: distance on raw inputs: l2, l1 or cosine
    #: run the normality test once per this many new distances (scipy's shapiro costs ~0.3 ms a call,
    #: mostly argument handling): an alarm comes at most this many queries later
    prada_test_every: int = 10
    growing_max: int = 256  #: growing-set inputs kept per class and subject
    distances_max: int = 1000  #: most recent distances kept per subject
    volume_window_s: float = 3600.0  #: sliding window of the volume signal
    volume_max: int = 2000  #: queries allowed within that window before the signal fires
    dup_window: int = 64  #: recent inputs compared for near-duplicates
    dup_rel: float = 0.02  #: "near": within this fraction of the larger norm
    dup_max_fraction: float = 0.5  #: fraction of near-duplicates in the window that fires the signal
    coverage_window: int = 200  #: recent bucket ids kept (coverage signal, needs a reference)
    #: fraction of recent queries outside the reference's region; a benign subject's expectation is
    #: ~0.01 (the radius is the reference's 99th percentile), so 0.2 is a 20x margin
    coverage_max_novel: float = 0.2
    coverage_factor: float = 2.0  #: distinct buckets vs the benign expectation
    coverage_clusters: int = 32  #: k-means cells fitted to the reference
    block_s: float = 86_400.0  #: how long a block lasts
    throttle_s: float = 60.0  #: how long a throttle refuses the subject
    actions: Mapping[str, Action] = field(default_factory=lambda: dict(_DEFAULT_ACTIONS))

    def __post_init__(self) -> None:
        unknown = set(self.actions) - set(SIGNALS)
        if unknown:
            raise ConfigError(f"unknown extraction signal(s): {sorted(unknown)}")
        actions = {**_DEFAULT_ACTIONS, **{k: Action(v) for k, v in self.actions.items()}}
        object.__setattr__(self, "actions", MappingProxyType(actions))
        PradaDetector(self.prada_threshold, self.prada_min_samples, self.prada_feature,
                      growing_max=self.growing_max, distances_max=self.distances_max,
                      test_every=self.prada_test_every)  # validates
        positive = ("volume_window_s", "dup_rel", "block_s", "throttle_s", "coverage_factor")
        if any(not (math.isfinite(getattr(self, n)) and getattr(self, n) > 0) for n in positive):
            raise ConfigError(f"{', '.join(positive)} must be positive numbers")
        if self.volume_max < 1 or self.dup_window < 2 or self.coverage_window < 1:
            raise ConfigError("volume_max >= 1, dup_window >= 2 and coverage_window >= 1 are required")
        if not (0 < self.dup_max_fraction <= 1 and 0 < self.coverage_max_novel <= 1):
            raise ConfigError("dup_max_fraction and coverage_max_novel must be within (0, 1]")
        if not 1 <= self.coverage_clusters <= 1024:
            raise ConfigError("coverage_clusters must be within 1..1024")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ExtractionPolicy:
        """Keys are the field names; ``actions`` maps signal names to action names. Unknown keys are a
        ConfigError."""
        names = set(cls.__dataclass_fields__)
        unknown = set(config) - names
        if unknown:
            raise ConfigError(f"unknown extraction policy key(s): {sorted(unknown)}")
        values = dict(config)
        if "actions" in values:
            raw = values["actions"]
            if not isinstance(raw, Mapping):
                raise ConfigError("actions must map signal names to action names")
            values["actions"] = {str(k): Action.parse(str(v)) for k, v in raw.items()}
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"bad extraction policy value ({type(err).__name__})") from None


@dataclass(frozen=True)
class Decision:
    """The monitor's answer for one observed call; ``evidence`` holds numbers for the audit log."""

    action: Action
    signals: tuple[str, ...]
    evidence: Mapping[str, float | int | None]
    #: until when (seconds from now) the subject is refused, for throttle / block
    refused_for_s: float | None = None

    def to_audit(self) -> dict[str, Any]:
        return {"action": self.action.label, "signals": list(self.signals), **self.evidence,
                "refused_for_s": self.refused_for_s}

    def error(self) -> AccessError | None:
        """The error the server raises for this decision (for the current call, if it chooses to)."""
        if self.action is Action.BLOCK:
            return PermissionDeniedError("extraction-blocked")
        if self.action is Action.THROTTLE:
            return QuotaExceededError("extraction-throttled", retry_after_s=self.refused_for_s or 0.0)
        return None


class _Coverage:
    """k-means cells fitted to a reference sample: a query's cell, whether it lies outside the region the
    reference covers (farther from its centroid than ``radius``), and benign expectations."""

    def __init__(self, reference: FloatArray, clusters: int, rng: np.random.Generator) -> None:
        k = min(clusters, len(reference))
        self.centroids, cells = kmeans2(reference, k, minit="++", seed=rng)
        dist = np.linalg.norm(reference - self.centroids[cells], axis=1)
        self.radius = float(np.quantile(dist, 0.99))
        counts = np.bincount(cells, minlength=k)
        self.p = counts[counts > 0] / counts.sum()

    def cells(self, x: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        d = np.linalg.norm(x[:, None, :] - self.centroids[None, :, :], axis=2)
        cell = np.argmin(d, axis=1)
        return cell, d[np.arange(len(x)), cell] > self.radius

    def expected_distinct(self, n: int) -> float:
        return float(np.sum(1.0 - (1.0 - self.p) ** n))


@dataclass(frozen=True)
class Windows:
    """A subject's sliding windows, the inputs of the volume, duplicates and coverage signals: queries
    within ``volume_window_s`` (at most ``volume_max + 1``), the near-duplicate flags of the last
    ``dup_window`` queries and the coverage cells of the last ``coverage_window`` (-1: outside)."""

    volume: int
    duplicate_flags: tuple[bool, ...]
    cells: tuple[int, ...]


class SharedAggregates(Protocol):
    """Where a subject's windows are kept for every enclave and boot (numbers only: a flag and a cell id
    per query, never an input): :class:`nitrovault.state.SharedAggregates`."""

    def record(self, subject: str, now: float, flags: list[bool], cells: list[int] | None) -> Windows: ...


class SharedRefusals(Protocol):
    """Where blocks and throttles are also kept so that every enclave, and the next boot, honours them
    (:class:`nitrovault.state.SharedRefusals`, in the shared state store)."""

    def admit(self, subject: str) -> None: ...

    def refuse(self, subject: str, kind: str, seconds: float) -> None: ...


@dataclass
class _Subject:
    prada: PradaDetector
    times: deque[float]
    recent: _Ring
    buckets: deque[int]
    dup_flags: deque[bool]
    queries: int = 0
    refused_until: float = 0.0  # throttles only; blocks live in the monitor's block list


class ExtractionMonitor:
    """Per-subject extraction detection (see the module docstring for signals and bounds)."""

    def __init__(
        self,
        policy: ExtractionPolicy | None = None,
        *,
        clock: Clock = utc_now,
        max_subjects: int = 10_000,
        reference: npt.ArrayLike | None = None,
        rng: np.random.Generator | None = None,
        refusals: SharedRefusals | None = None,
        aggregates: SharedAggregates | None = None,
    ) -> None:
        # both LRU-bounded by max_subjects (ConfigError below 1) and only used under self._lock; blocks
        # are kept apart so that evicting a subject's state does not lift its block
        self._subjects: SubjectTable[_Subject] = SubjectTable(max_subjects)
        self._blocks: SubjectTable[float] = SubjectTable(max_subjects)  # subject -> blocked until
        self.policy = policy or ExtractionPolicy()
        self._refusals = refusals
        self._aggregates = aggregates
        self._clock = clock
        self._lock = threading.Lock()
        self._coverage: _Coverage | None = None
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)  # type: ignore[arg-type]
            self._coverage = _Coverage(ref, self.policy.coverage_clusters, rng or np.random.default_rng(0))

    def __len__(self) -> int:
        with self._lock:
            return len(self._subjects)

    @property
    def blocked(self) -> int:
        with self._lock:
            return len(self._blocks)

    def _now(self) -> float:
        return self._clock().timestamp()

    def admit(self, subject: str) -> None:
        """Refuse a subject that is blocked (PermissionDeniedError) or throttled (QuotaExceededError)."""
        now = self._now()
        with self._lock:
            until = self._blocks.peek(subject)
            if until is not None:
                if now < until:
                    raise PermissionDeniedError("extraction-blocked")
                self._blocks.pop(subject)
            state = self._subjects.peek(subject)
            if state is not None and now < state.refused_until:
                raise QuotaExceededError("extraction-throttled", retry_after_s=state.refused_until - now)
        if self._refusals is not None:  # what any enclave decided, before this one restarted too
            self._refusals.admit(subject)

    def _new_subject(self) -> _Subject:
        p = self.policy
        return _Subject(
            prada=PradaDetector(p.prada_threshold, p.prada_min_samples, p.prada_feature,
                                growing_max=p.growing_max, distances_max=p.distances_max,
                                test_every=p.prada_test_every),
            times=deque(maxlen=p.volume_max + 1),
            recent=_Ring(p.dup_window),
            buckets=deque(maxlen=p.coverage_window),
            dup_flags=deque(maxlen=p.dup_window),
        )

    def _state(self, subject: str) -> _Subject:
        """The subject's state, now the most recently seen (the least recently seen is evicted beyond
        ``max_subjects`` and starts over)."""
        return self._subjects.get_or_create(subject, self._new_subject)

    def observe(self, subject: str, inputs: npt.ArrayLike, labels: npt.ArrayLike) -> Decision:
        """Account one answered call: ``inputs`` [batch, ...] and the model's arg-max ``labels`` [batch]."""
        x = np.asarray(inputs, dtype=np.float64)
        x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
        y = np.asarray(labels).reshape(-1)
        if len(y) != len(x):
            raise ValueError("one label per input row is needed")
        now = self._now()
        p = self.policy
        cells = self._cells(x)  # this call's coverage cells (-1: outside the reference's region)
        with self._lock:
            state = self._state(subject)
            flags: list[bool] = []
            for row, label in zip(x, y, strict=True):
                state.queries += 1
                state.times.append(now)
                state.prada.add(row, int(label))
                if state.recent and state.recent.view().shape[1] == row.shape[0]:
                    recent = state.recent.view()
                    scale = np.maximum(np.linalg.norm(recent, axis=1), np.linalg.norm(row))
                    near = np.linalg.norm(recent - row, axis=1) <= p.dup_rel * np.maximum(scale, 1e-12)
                    flags.append(bool(near.any()))
                else:
                    flags.append(False)
                state.recent.append(row)
            state.dup_flags.extend(flags)
            if cells is not None:
                state.buckets.extend(cells)
            prada = state.prada.result()  # one normality test per call, after all its rows
            times = state.times  # appended in clock order: expired ones sit at the left
            while times and times[0] <= now - p.volume_window_s:
                times.popleft()
            windows = Windows(len(times), tuple(state.dup_flags), tuple(state.buckets))
            queries = state.queries
        if self._aggregates is not None:  # the subject's windows over every enclave and boot
            windows = self._aggregates.record(subject, now, flags, cells)
        evidence, fired = self._signals(queries, prada, windows)
        action = max((p.actions[s] for s in fired), default=Action.NONE)
        refused_for: float | None = None
        with self._lock:
            if action is Action.BLOCK:
                # beyond max_subjects the least recently set block is dropped: with one block_s, the
                # one that ends first
                self._blocks.put(subject, now + p.block_s)
                refused_for = p.block_s
            elif action is Action.THROTTLE:
                self._state(subject).refused_until = now + p.throttle_s
                refused_for = p.throttle_s
        if self._refusals is not None and refused_for is not None:  # outside the lock: a store round trip
            self._refusals.refuse(subject, "block" if action is Action.BLOCK else "throttle", refused_for)
        return Decision(action=action, signals=tuple(fired), evidence=MappingProxyType(evidence),
                        refused_for_s=refused_for)

    def _cells(self, x: FloatArray) -> list[int] | None:
        if self._coverage is None:
            return None
        cells, outside = self._coverage.cells(x)
        return [int(c) if not o else -1 for c, o in zip(cells, outside, strict=True)]

    def _signals(self, queries: int, prada: PradaResult,
                 windows: Windows) -> tuple[dict[str, float | int | None], list[str]]:
        p = self.policy
        fired: list[str] = []
        if prada.alarm:
            fired.append("prada")
        if windows.volume > p.volume_max:
            fired.append("volume")
        flags = windows.duplicate_flags
        dup_fraction = sum(flags) / len(flags) if len(flags) >= p.dup_window // 2 else 0.0
        if dup_fraction > p.dup_max_fraction:
            fired.append("duplicates")
        novel: float | None = None
        distinct: int | None = None
        expected: float | None = None
        if self._coverage is not None:
            buckets = windows.cells
            novel = float(np.mean(np.asarray(buckets) < 0)) if buckets else 0.0
            distinct = len(set(buckets) - {-1})
            expected = self._coverage.expected_distinct(len(buckets))
            if len(buckets) >= p.coverage_window // 2 and (
                novel > p.coverage_max_novel or distinct > p.coverage_factor * expected
            ):
                fired.append("coverage")
        evidence: dict[str, float | int | None] = {
            "queries": queries,
            "prada_w": None if prada.w is None else round(prada.w, 4),
            "prada_n": prada.n,
            "volume_in_window": windows.volume,
            "duplicate_fraction": round(dup_fraction, 4),
            "coverage_novel": None if novel is None else round(novel, 4),
            "coverage_distinct": distinct,
            "coverage_expected": None if expected is None else round(expected, 2),
        }
        return evidence, fired
