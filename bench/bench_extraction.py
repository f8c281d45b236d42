"""Model stealing, measured with a thief we did not write (IBM's adversarial-robustness-toolbox).

Victim: :class:`enclave_app.models.generic.MLPClassifier` trained on scikit-learn's digits (see
``bench/extraction_victim.py``). Thieves: ART's ``CopycatCNN`` and ``KnockoffNets`` (random strategy
for the fidelity grid, adaptive for the alarm runs), each training a ``PyTorchClassifier`` surrogate
(a small MLP) on what a ``BlackBoxClassifier`` around the query function answers. The attacker holds
a few labelled natural seeds (5 per class, from its own half of the data) and grows its query pool by
Jacobian-augmentation-like random signed steps (``jacobian_like_pool``): the PRADA threat model.

**In process**: the query function applies the monitor and the hardening around a direct call of the
model (same order as the enclave); routing it through the live local stack is the wiring step.

Lines:

* ``hardening_cost``: top-1 accuracy of the victim's answers on the test split under each policy
  (``ratio`` = accuracy / unprotected accuracy);
* ``extraction_fidelity``: ``policy``, ``attack``, ``thief`` (``probabilities``/``labels``),
  ``queries`` in {300, 1000, 3000}, ``fidelity`` = agreement of surrogate and victim (clean arg-max)
  on the test split, ``ratio`` = fidelity / unprotected (``full``) fidelity at the same N and thief;
* ``extraction_queries_to_alarm``: ``attack``, ``queries`` until the monitor first throttles or
  blocks (null: never, within ``budget`` queries), plus the first signal of each kind;
* ``benign_false_alarms``: ``subjects`` each sending 100 test-split digits, ``alarms`` = subjects
  throttled or blocked (``records``: subjects with only a record).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.extraction_victim import (
    FakeClock,
    Log,
    jacobian_like_pool,
    load_split,
    make_query,
    predict_proba,
    train_mlp,
)
from nitrovault.protection import ExtractionMonitor, ExtractionPolicy, HardeningPolicy, PrivacyMechanism

QUERIES = (300, 1000, 3000)
POLICIES: dict[str, dict[str, Any]] = {
    "full": {"kind": "full"},
    "top_k": {"kind": "top_k", "k": 3},
    "rounded": {"kind": "rounded", "decimals": 1},
    "reverse_sigmoid": {"kind": "reverse_sigmoid", "beta": 1.0, "gamma": 0.3},
    "label_only": {"kind": "label_only"},
}
#: the policy the targets are measured against (the default a model owner should start from)
DEFAULT_POLICY = "reverse_sigmoid"
THIEF_EPOCHS = 40


def _thief() -> Any:
    from art.estimators.classification import PyTorchClassifier

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam(model.parameters(), lr=5e-3),
        input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0),
    )


def _blackbox(query: Callable[[np.ndarray], np.ndarray]) -> Any:
    from art.estimators.classification import BlackBoxClassifier

    # no postprocessing defences on the ART side: ClassLabels is wrong for batches > 1, and the
    # hardening is the victim's job anyway
    return BlackBoxClassifier(query, input_shape=(64,), nb_classes=10, clip_values=(0.0, 1.0))


def _steal(attack: str, query: Callable[[np.ndarray], np.ndarray], pool: np.ndarray, n: int,
           probabilities: bool, *, seed: int, y_pool: np.ndarray | None = None,
           batch_query: int = 64, epochs: int = THIEF_EPOCHS) -> Any:
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    np.random.seed(seed)  # ART samples its queries with the global generator
    torch.manual_seed(seed)
    victim = _blackbox(query)
    if attack == "copycat":
        thief = CopycatCNN(victim, batch_size_fit=64, batch_size_query=batch_query, nb_epochs=epochs,
                           nb_stolen=n, use_probability=probabilities)
        return thief.extract(pool, thieved_classifier=_thief())
    strategy = "adaptive" if y_pool is not None else "random"
    thief = KnockoffNets(victim, batch_size_fit=64, batch_size_query=batch_query, nb_epochs=epochs,
                         nb_stolen=n, use_probability=probabilities, sampling_strategy=strategy,
                         reward="all", verbose=False)
    return thief.extract(pool, y_pool, thieved_classifier=_thief())


def run() -> Iterator[dict[str, object]]:
    started = time.perf_counter()
    torch.set_num_threads(2)
    data = load_split()
    victim = train_mlp(data.x_victim, data.y_victim)
    clean = predict_proba(victim, data.x_test)
    victim_labels = clean.argmax(axis=1)
    accuracy = float(np.mean(victim_labels == data.y_test))
    rng = np.random.default_rng(0)
    seed_idx = np.concatenate([np.flatnonzero(data.y_attacker == c)[:5] for c in range(10)])
    seeds, seed_labels = data.x_attacker[seed_idx], data.y_attacker[seed_idx]
    pool, origin = jacobian_like_pool(seeds, max(QUERIES), rng)

    harden: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        name: HardeningPolicy.from_config(cfg).apply for name, cfg in POLICIES.items()
    }
    dp = PrivacyMechanism.from_config({"kind": "laplace", "epsilon": 2.0, "sensitivity": 2.0})
    dp_rng = np.random.default_rng(1)
    harden["laplace_eps2"] = lambda p: dp.apply(p, rng=dp_rng)

    for name, fn in harden.items():
        acc = float(np.mean(fn(clean).argmax(axis=1) == data.y_test))
        yield {"name": "hardening_cost", "policy": name, "accuracy": round(acc, 4),
               "unprotected_accuracy": round(accuracy, 4), "ratio": round(acc / accuracy, 4)}

    baseline: dict[tuple[str, str, int], float] = {}
    for name, fn in harden.items():
        for attack in ("copycat", "knockoff"):
            for probabilities in (True, False):
                thief_kind = "probabilities" if probabilities else "labels"
                for n in QUERIES:
                    surrogate = _steal(attack, make_query(victim, fn), pool, n, probabilities,
                                       seed=n + (attack == "knockoff"))
                    fidelity = float(np.mean(surrogate.predict(data.x_test).argmax(axis=1) == victim_labels))
                    key = (attack, thief_kind, n)
                    if name == "full":
                        baseline[key] = fidelity
                    yield {"name": "extraction_fidelity", "policy": name, "attack": attack,
                           "thief": thief_kind, "queries": n, "fidelity": round(fidelity, 4),
                           "ratio": round(fidelity / baseline[key], 4) if baseline.get(key) else None,
                           "default_policy": name == DEFAULT_POLICY}

    default = harden[DEFAULT_POLICY]
    budget = 3000
    attacks: dict[str, tuple[str, np.ndarray, np.ndarray | None]] = {
        "copycat": ("copycat", pool, None),
        # adaptive KnockoffNets needs the attacker's labels of its pool: the label of each point's seed
        "knockoff": ("knockoff", pool, seed_labels[origin]),
        "copycat_natural_pool": ("copycat", np.concatenate([data.x_attacker] * 5), None),
        "copycat_uniform_noise": ("copycat", rng.uniform(0, 1, (budget, 64)).astype(np.float32), None),
    }
    for label, (attack, attack_pool, y_pool) in attacks.items():
        clock = FakeClock(per_query_s=1.0)
        monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=data.x_victim)
        log = Log()
        query = make_query(victim, default, monitor=monitor, clock=clock, log=log)
        _steal(attack, query, attack_pool, budget, True, seed=7, y_pool=y_pool, batch_query=1,
               epochs=1 if y_pool is not None else 2)
        acted = [v for k, v in log.first.items() if k in ("throttle", "block")]
        yield {"name": "extraction_queries_to_alarm", "attack": label,
               "queries": min(acted) if acted else None,
               "budget": log.rows, "first_action": dict(log.first), "first_signal": dict(log.signals),
               "policy": DEFAULT_POLICY}

    subjects, alarms, records = 20, 0, 0
    clock = FakeClock(per_query_s=10.0)
    monitor = ExtractionMonitor(ExtractionPolicy(), clock=clock, reference=data.x_victim)
    for s in range(subjects):
        log = Log()
        query = make_query(victim, default, monitor=monitor, clock=clock, subject=f"user{s}", log=log)
        order = np.random.default_rng(100 + s).permutation(len(data.x_test))[:100]
        for i in order:
            query(data.x_test[i : i + 1])
        alarms += any(k in ("throttle", "block") for k in log.first)
        records += set(log.first) == {"record"}
    yield {"name": "benign_false_alarms", "subjects": subjects, "alarms": alarms, "records": records,
           "queries_per_subject": 100, "ratio": alarms / subjects}
    yield {"name": "extraction_bench_seconds", "seconds": round(time.perf_counter() - started, 1),
           "victim_accuracy": round(accuracy, 4)}
