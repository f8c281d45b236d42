"""Model stealing, measured with a thief we did not write (IBM's adversarial-robustness-toolbox), against
the victim served by the live local stack.

Victim: :class:`enclave_app.models.generic.MLPClassifier` trained on scikit-learn's digits (see
``bench/extraction_victim.py``), sealed with the extraction detector's reference sample (its training
inputs) and served by a :class:`~nitrovault.local.stack.LocalStack`: every query is an ``Infer`` call
through the parent's relay with a signed token, so auth, quotas, extraction detection, calibrated
noise and hardening all run inside the enclave, with its real clock. Thieves: ART's ``CopycatCNN`` and
``KnockoffNets`` (random strategy for the fidelity grid, adaptive for the alarm runs), each training a
``PyTorchClassifier`` surrogate (a small MLP) on what a ``BlackBoxClassifier`` around the query
function answers. The attacker holds a few labelled natural seeds (5 per class, from its own half of
the data) and grows its query pool by Jacobian-augmentation-like random signed steps
(``jacobian_like_pool``): the PRADA threat model.

One stack per protection setting, all in one home (PKI, KMS key and sealed model are made once and
reused; a restart re-measures the enclave config and re-binds the key policy, ~15-20 s):

* the fidelity grid, one stack per hardening policy (``full``, ``top_k`` k=3, ``rounded`` 1 decimal,
  ``reverse_sigmoid`` beta=1 gamma=0.3, ``label_only``) plus ``laplace_eps2`` (Laplace noise ε=2 per row,
  Δ₁=2, through ``privacy`` with a per-subject budget of ε=8000, more than the 3000 rows of the largest
  run costs), with extraction detection in ``record``-only mode, so the thief is always answered and
  fidelity measures the output policy alone;
* one enforcing stack (``reverse_sigmoid`` and detection with its default actions: PRADA blocks,
  volume/duplicates/coverage throttle) for the alarm runs and the benign workload.

Every stack's quota tier (:data:`BENCH_TIERS`) is far above what the bench sends (10^6 rows per second
and burst), so quotas never refuse a call: a fidelity run with any refused row is an error, not a
number. Each run queries as its own subject (its own detector state and privacy budget).

Lines (each with ``"served_by": "local-stack"``):

* ``hardening_cost``: top-1 accuracy of the enclave's answers on the test split under each policy
  (``ratio`` = accuracy / unprotected accuracy);
* ``extraction_fidelity``: ``policy``, ``attack``, ``thief`` (``probabilities``/``labels``),
  ``queries`` in {300, 1000, 3000}, ``fidelity`` = agreement of surrogate and victim (clean arg-max)
  on the test split, ``ratio`` = fidelity / unprotected (``full``) fidelity at the same N and thief;
* ``extraction_queries_to_alarm``: ``attack``, ``queries`` = the subject's query count at the first
  throttle or block, read from the enclave's own evidence (``protection.extraction`` of the audit
  records the parent stored; null: never, within ``budget`` queries), ``first_action`` and
  ``first_signal`` from the same records (after the first refusal the subject is refused at admission,
  so only signals up to the alarm are seen), and the client's view: ``client_first_refusal`` = rows
  answered before the first refused call;
* ``benign_false_alarms``: ``subjects`` each sending 100 test-split digits one at a time, ``alarms`` =
  subjects throttled or blocked (``records``: subjects with only a record), from the audit log.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.extraction_victim import (
    Log,
    jacobian_like_pool,
    load_split,
    make_query,
    predict_proba,
    save_victim,
    serve,
    train_mlp,
    victim_token,
)
from nitrovault.client import NitrovaultClient
from nitrovault.local.stack import LocalStack
from nitrovault.protection.extraction import SIGNALS

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
#: detection that only watches (every signal's action is ``record``): the fidelity grid's setting
RECORD_ONLY: dict[str, Any] = {"actions": dict.fromkeys(SIGNALS, "record")}
LAPLACE_EPSILON = 2.0
#: far above what the bench sends, so quotas never interfere (module docstring)
BENCH_TIERS = {"default": {"rate_per_s": 1e6, "burst": 1_000_000}}
#: fidelity-grid settings: name -> the enclave config's ``protection`` section
SETTINGS: dict[str, dict[str, Any]] = {
    **{name: {"hardening": policy, "extraction": RECORD_ONLY} for name, policy in POLICIES.items()},
    "laplace_eps2": {
        "privacy": {"mechanism": {"kind": "laplace", "epsilon": LAPLACE_EPSILON, "sensitivity": 2.0},
                    "budget": {"epsilon": LAPLACE_EPSILON * 4000}},
        "extraction": RECORD_ONLY,
    },
}
#: the alarm runs' setting: the default policy, detection with its default actions
ENFORCING: dict[str, Any] = {"hardening": POLICIES[DEFAULT_POLICY], "extraction": {}}
SERVED_BY = {"served_by": "local-stack"}


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


def _audit_records(
    stack: LocalStack, subject: str, calls: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """The audit records of ``subject``'s ``Infer`` calls, in call order, once all ``calls`` arrived
    (the enclave streams them to the parent, which stores them in ``HOME/audit/<boot>/``)."""
    deadline = time.monotonic() + timeout
    while True:
        folder = stack.current_audit_dir()
        records: list[dict[str, Any]] = []
        for path in sorted(folder.glob("audit-*.jsonl")) if folder is not None else ():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                body = entry["body"]
                if entry["kind"] == "record" and body.get("subject") == subject and body["method"] == "Infer":
                    records.append(body)
        if len(records) >= calls:
            return records
        if time.monotonic() > deadline:
            raise RuntimeError(f"the audit log holds {len(records)} of {calls} records of {subject}")
        time.sleep(0.2)


def _first_actions(records: list[dict[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """The subject's query count at the first action of each kind and the first firing of each signal,
    from the enclave's evidence (``protection.extraction``: ``action``, ``signals``, ``queries``)."""
    first_action: dict[str, int] = {}
    first_signal: dict[str, int] = {}
    for record in records:
        evidence = (record.get("protection") or {}).get("extraction")
        if evidence is None:
            continue
        queries = int(evidence["queries"])
        first_action.setdefault(evidence["action"], queries)
        for signal in evidence["signals"]:
            first_signal.setdefault(signal, queries)
    return first_action, first_signal


def _client(stack: LocalStack, subject: str) -> NitrovaultClient:
    # the stack's measured PCR0/1/2 under its local PKI root (LocalStack.expect)
    return NitrovaultClient(stack.listen, expect=stack.expect(), token=victim_token(stack, subject),
                            timeout=60)


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
    stack_seconds: list[float] = []

    with tempfile.TemporaryDirectory(prefix="nv-extraction-") as tmp:
        home, weights = Path(tmp) / "home", Path(tmp) / "victim.safetensors"
        save_victim(victim, weights, reference=data.x_victim)

        baseline: dict[tuple[str, str, int], float] = {}
        for name, protection in SETTINGS.items():
            t0 = time.perf_counter()
            with serve(home, weights, protection, tiers=BENCH_TIERS) as stack:
                stack_seconds.append(time.perf_counter() - t0)
                log = Log()
                with _client(stack, "benign-accuracy") as client:
                    answers = make_query(client, log=log)(data.x_test)
                if log.refused:
                    raise RuntimeError(f"{name}: {log.refused} test rows refused ({log.codes})")
                acc = float(np.mean(answers.argmax(axis=1) == data.y_test))
                yield {"name": "hardening_cost", "policy": name, "accuracy": round(acc, 4),
                       "unprotected_accuracy": round(accuracy, 4), "ratio": round(acc / accuracy, 4),
                       **SERVED_BY}
                for attack in ("copycat", "knockoff"):
                    for probabilities in (True, False):
                        thief_kind = "probabilities" if probabilities else "labels"
                        for n in QUERIES:
                            log = Log()
                            with _client(stack, f"{name}-{attack}-{thief_kind}-{n}") as client:
                                query = make_query(client, log=log)
                                surrogate = _steal(attack, query, pool, n, probabilities,
                                                   seed=n + (attack == "knockoff"))
                            if log.refused:  # record-only detection and a generous tier: never expected
                                raise RuntimeError(f"{name}/{attack}/{thief_kind}/{n}: {log.refused} rows "
                                                   f"refused ({log.codes}); the fidelity would be wrong")
                            fidelity = float(np.mean(surrogate.predict(data.x_test).argmax(axis=1)
                                                     == victim_labels))
                            key = (attack, thief_kind, n)
                            if name == "full":
                                baseline[key] = fidelity
                            yield {"name": "extraction_fidelity", "policy": name, "attack": attack,
                                   "thief": thief_kind, "queries": n, "fidelity": round(fidelity, 4),
                                   "ratio": round(fidelity / baseline[key], 4) if baseline.get(key) else None,
                                   "default_policy": name == DEFAULT_POLICY, **SERVED_BY}

        budget = 3000
        attacks: dict[str, tuple[str, np.ndarray, np.ndarray | None]] = {
            "copycat": ("copycat", pool, None),
            # adaptive KnockoffNets needs the attacker's labels of its pool: the label of each point's seed
            "knockoff": ("knockoff", pool, seed_labels[origin]),
            "copycat_natural_pool": ("copycat", np.concatenate([data.x_attacker] * 5), None),
            "copycat_uniform_noise": ("copycat", rng.uniform(0, 1, (budget, 64)).astype(np.float32), None),
        }
        t0 = time.perf_counter()
        with serve(home, weights, ENFORCING, tiers=BENCH_TIERS) as stack:
            stack_seconds.append(time.perf_counter() - t0)
            for label, (attack, attack_pool, y_pool) in attacks.items():
                subject = f"alarm-{label}"
                log = Log()
                with _client(stack, subject) as client:
                    _steal(attack, make_query(client, log=log), attack_pool, budget, True, seed=7,
                           y_pool=y_pool, batch_query=1, epochs=1 if y_pool is not None else 2)
                first_action, first_signal = _first_actions(_audit_records(stack, subject, log.calls))
                acted = [v for k, v in first_action.items() if k in ("throttle", "block")]
                yield {"name": "extraction_queries_to_alarm", "attack": label,
                       "queries": min(acted) if acted else None, "budget": log.rows + log.refused,
                       "first_action": first_action, "first_signal": first_signal,
                       "client_first_refusal": log.first_refusal, "refused": log.refused,
                       "refusal_codes": log.codes, "policy": DEFAULT_POLICY, **SERVED_BY}

            subjects, alarms, records, refused_subjects = 20, 0, 0, 0
            for s in range(subjects):
                log = Log()
                with _client(stack, f"user{s}") as client:
                    query = make_query(client, log=log)
                    order = np.random.default_rng(100 + s).permutation(len(data.x_test))[:100]
                    for i in order:
                        query(data.x_test[i : i + 1])
                first_action, _ = _first_actions(_audit_records(stack, f"user{s}", log.calls))
                alarms += any(k in ("throttle", "block") for k in first_action)
                records += set(first_action) == {"record"}
                refused_subjects += log.refused > 0
            yield {"name": "benign_false_alarms", "subjects": subjects, "alarms": alarms, "records": records,
                   "refused_subjects": refused_subjects, "queries_per_subject": 100,
                   "ratio": alarms / subjects, **SERVED_BY}
    yield {"name": "extraction_bench_seconds", "seconds": round(time.perf_counter() - started, 1),
           "victim_accuracy": round(accuracy, 4), "stack_starts": len(stack_seconds),
           "stack_start_seconds": round(sum(stack_seconds), 1), **SERVED_BY}
