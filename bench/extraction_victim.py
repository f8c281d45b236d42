"""The victim, the attacker's data and the query function of ``bench_extraction`` (torch, sklearn).

The victim is :class:`enclave_app.models.generic.MLPClassifier` (the architecture the enclave serves)
trained here on scikit-learn's digits (8x8 images, pixels scaled to [0, 1]). The data is split once:
30 % test (fidelity and benign workload), and the rest in two halves: the victim's training set and
the attacker's own natural data (from which it takes a few labelled seeds).

**Served by the live local stack**: :func:`save_victim` writes the trained weights as a plain
safetensors file (with the victim's training inputs as the extraction detector's sealed reference
sample), :func:`serve` seals it and runs it in a :class:`~nitrovault.local.stack.LocalStack` under a
measured ``protection`` section, and :func:`make_query` is the thief's view: every query is an
``Infer`` call through the parent's relay with a signed token, so it goes through auth, quotas, the
extraction monitor (admit → model → observe), noise and hardening *inside the enclave*, with the
enclave's real clock. The thieves only ever see the query function.

Invariants: a refused call (``PERMISSION_DENIED`` or ``RESOURCE_EXHAUSTED``: blocked, throttled, out of
privacy budget) comes back to the thief as uniform vectors (what a thief that ignores errors would
train on) and is counted in its :class:`Log`; any other error (the stack is down, a bad request) is
raised, never turned into data. :func:`serve` ends every process it started, also on failure.

Example::

    data = load_split()
    victim = train_mlp(data.x_victim, data.y_victim)
    save_victim(victim, home / "victim.safetensors", reference=data.x_victim)
    with serve(home, home / "victim.safetensors", {"hardening": {"kind": "top_k", "k": 3}}) as stack, \\
            NitrovaultClient(stack.listen, expect=stack.expect(),
                             token=victim_token(stack, "thief")) as client:
        probabilities = make_query(client)(data.x_test[:10])
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from enclave_app.models.generic import MLPClassifier
from nitrovault.client import NitrovaultClient
from nitrovault.errors import ClientError
from nitrovault.local.digits import DIGITS_HANDLER, save_classifier, train_classifier
from nitrovault.local.homes import free_port
from nitrovault.local.models import LocalModel
from nitrovault.local.stack import LocalStack, TextProgress

Query = Callable[[np.ndarray], np.ndarray]

MODEL_ID = "digits-mlp"
CLASSES = 10
#: gRPC codes of a refusal (blocked, throttled, privacy budget or quota spent): the thief gets uniform
#: vectors for these; every other code is an error of the bench or the stack and is raised
REFUSALS = frozenset({"PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})


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


#: the victim's trainer is the digits demo's (``nitrovault local up --model digits`` serves the same model)
train_mlp = train_classifier


def predict_proba(model: MLPClassifier, x: np.ndarray) -> np.ndarray:
    """The victim's clean answers, in process: only for the fidelity reference (the clean arg-max)."""
    with torch.inference_mode():
        out = model(torch.from_numpy(np.asarray(x, dtype=np.float32)))["probabilities"]
    return np.asarray(out.numpy(), dtype=np.float64)


#: the plain model :func:`serve` seals (weights, metadata, the coverage reference)
save_victim = save_classifier


@contextlib.contextmanager
def serve(home: Path, weights: Path, protection: Mapping[str, Any],
          tiers: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[LocalStack]:
    """A local stack serving the victim under ``protection`` (a measured enclave config section).

    The same ``home`` reuses the PKI, the KMS key and the sealed model across restarts: only the
    enclave config (so the PCRs and the key policy binding) changes. Progress goes to stderr (the
    bench's stdout is JSON lines). Every process is ended when the block exits, however it exits.
    """
    model = LocalModel(MODEL_ID, "1", DIGITS_HANDLER, weights, protection=protection, tiers=tiers)
    stack = LocalStack(home, model=model, listen=f"127.0.0.1:{free_port()}",
                       progress=TextProgress(sys.stderr))
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


def victim_token(stack: LocalStack, subject: str) -> str:
    """A token of the stack's issuer for ``subject``, allowed to call ``Infer`` on the victim only."""
    return stack.token(subject, (f"infer:{MODEL_ID}",))


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
class Log:
    """What one subject's queries got, as the thief sees it (the enclave's evidence is in its audit log)."""

    #: rows answered
    rows: int = 0
    #: ``Infer`` calls made, answered or refused (each leaves one audit record)
    calls: int = 0
    #: rows refused (returned to the thief as uniform vectors)
    refused: int = 0
    #: rows answered before the first refused call (None: never refused)
    first_refusal: int | None = None
    #: refused calls per gRPC code
    codes: dict[str, int] = field(default_factory=dict)


def make_query(client: NitrovaultClient, *, log: Log | None = None, max_batch: int = 64) -> Query:
    """The thief's view of the victim: ``query(x) -> probabilities`` [rows, 10], each chunk of at most
    ``max_batch`` rows one ``Infer`` call through the live stack (``client`` carries the subject's
    token). Refusals come back as uniform vectors and are counted in ``log`` (module docstring)."""
    log = log if log is not None else Log()

    def query(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        out = np.empty((len(x), CLASSES), dtype=np.float64)
        for start in range(0, len(x), max_batch):
            chunk = x[start : start + max_batch]
            log.calls += 1
            try:
                answer = client.infer({"x": chunk})["probabilities"]
            except ClientError as err:
                if err.code not in REFUSALS:
                    raise
                if log.first_refusal is None:
                    log.first_refusal = log.rows
                log.refused += len(chunk)
                log.codes[err.code] = log.codes.get(err.code, 0) + 1
                out[start : start + len(chunk)] = 1.0 / CLASSES
                continue
            log.rows += len(chunk)
            out[start : start + len(chunk)] = answer
        return out

    return query
