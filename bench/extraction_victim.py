"""The victim, the attacker's data and the query function of ``bench_extraction`` (torch, sklearn).

The victim is :class:`enclave_app.models.generic.MLPClassifier` (the architecture the enclave serves)
trained here on scikit-learn's digits (8x8 images, pixels scaled to [0, 1]). The data is split once:
30 % test (fidelity and benign workload), and the rest in two halves: the victim's training set and
the attacker's own natural data (from which it takes a few labelled seeds).

**In process, for now**: :func:`make_query` applies the hardening policy and the extraction monitor
around a direct call of the model, exactly in the order the enclave's serving path will (admit →
model → observe → harden). Serving the victim through the live local stack is the wiring step: replace
the ``answer = _local_answer(...)`` line by a call through ``nitrovault.client`` with a signed token,
and let the enclave do admit/observe/harden; the thieves only ever see the query function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from enclave_app.models.generic import MLPClassifier
from nitrovault.errors import AccessError
from nitrovault.protection import Action, ExtractionMonitor

Query = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Digits:
    x_victim: np.ndarray
    y_victim: np.ndarray
    x_attacker: np.ndarray
    y_attacker: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(seed: int = 0) -> Digits:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    x_v, x_a, y_v, y_a = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    return Digits(x_v, y_v, x_a, y_a, x_test, y_test)


def train_mlp(
    x: np.ndarray, y: np.ndarray, *, hidden: int = 64, epochs: int = 150, seed: int = 0
) -> MLPClassifier:
    """Full-batch Adam on a tiny MLP: ~1 s on one core."""
    torch.manual_seed(seed)
    model = MLPClassifier(x.shape[1], [hidden], int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt)["logits"], yt)
        loss.backward()
        opt.step()
    model.eval()
    return model


def predict_proba(model: MLPClassifier, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = model(torch.from_numpy(np.asarray(x, dtype=np.float32)))["probabilities"]
    return out.numpy().astype(np.float64)


def jacobian_like_pool(
    seeds: np.ndarray, n: int, rng: np.random.Generator, step: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Papernot-style synthetic augmentation without gradients: each new point is a random signed step
    of ``step`` from a point already in the pool (seeds first), clipped to [0, 1]. Returns the ``n``
    new points and, for each, the index of the seed it descends from."""
    pool = list(seeds)
    origin = list(range(len(seeds)))
    while len(pool) < n + len(seeds):
        i = int(rng.integers(len(pool)))
        pool.append(np.clip(pool[i] + step * np.sign(rng.standard_normal(pool[i].shape)), 0.0, 1.0))
        origin.append(origin[i])
    return np.asarray(pool[len(seeds):], dtype=np.float32), np.asarray(origin[len(seeds):])


@dataclass
class FakeClock:
    """Advances ``per_query_s`` per answered row: the attacker's (or user's) pace."""

    per_query_s: float = 1.0
    now: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def tick(self, rows: int) -> None:
        self.now += timedelta(seconds=self.per_query_s * rows)


@dataclass
class Log:
    """What the monitor did to one subject: rows answered until the first action of each kind."""

    rows: int = 0
    first: dict[str, int] = field(default_factory=dict)
    signals: dict[str, int] = field(default_factory=dict)
    refused: int = 0


def _local_answer(model: MLPClassifier, x: np.ndarray) -> np.ndarray:
    return predict_proba(model, x)


def make_query(
    model: MLPClassifier,
    harden: Callable[[np.ndarray], np.ndarray],
    *,
    monitor: ExtractionMonitor | None = None,
    clock: FakeClock | None = None,
    subject: str = "thief",
    enforce: bool = False,
    log: Log | None = None,
) -> Query:
    """The thief's view of the victim: ``query(x) -> probabilities`` after detection and ``harden``
    (a :class:`~nitrovault.protection.HardeningPolicy`'s ``apply``, or a privacy mechanism).

    With ``enforce=False`` the monitor only watches (the thief is answered anyway, so fidelity
    measures the hardening alone); with ``enforce=True`` refused calls come back as uniform vectors
    (what a thief that ignores errors would train on).
    """
    log = log if log is not None else Log()

    def query(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        if monitor is not None and enforce:
            try:
                monitor.admit(subject)
            except AccessError:
                log.refused += len(x)
                return np.full((len(x), 10), 0.1)
        answer = _local_answer(model, x)  # <- the one line to swap for a gRPC call through the local stack
        if monitor is not None:
            decision = monitor.observe(subject, x, answer.argmax(axis=1))
            log.rows += len(x)
            if clock is not None:
                clock.tick(len(x))
            if decision.action is not Action.NONE:
                log.first.setdefault(decision.action.label, log.rows)
                for s in decision.signals:
                    log.signals.setdefault(s, log.rows)
        return harden(answer)

    return query
