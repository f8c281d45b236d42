"""The dynamic batcher (``enclave_app.batching``): which jobs share a batch, and what each caller gets.

Every test decides when the workers are busy with a gate, so what forms a batch never depends on timing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import pytest
from fakes import WAIT_S, FakeMonotonic, wait_until

from enclave_app.batching import Batcher, Job
from enclave_app.config import Batching, EnclaveConfig
from enclave_app.status import NotReadyError
from nitrovault.errors import ConfigError
from nitrovault.kms.trust import amazon_trust_services_pem


class Recorder:
    """A batch function that records every batch's payloads; the first ``held`` batches wait on a gate."""

    def __init__(self, held: int = 1) -> None:
        self.batches: list[list[Any]] = []
        self.held = held
        self.gate = threading.Event()
        self.started = threading.Condition()

    def __call__(self, payloads: Sequence[Any]) -> list[Any]:
        with self.started:
            self.batches.append(list(payloads))
            held = len(self.batches) <= self.held
            self.started.notify_all()
        if held:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return [p.upper() if isinstance(p, str) else p for p in payloads]

    def wait_batches(self, n: int) -> None:
        with self.started:
            assert self.started.wait_for(lambda: len(self.batches) >= n, WAIT_S), self.batches


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.gate.set()


def start(recorder: Recorder, **options: Any) -> Batcher[Any, Any]:
    options = {"workers": 1, "max_rows": 8, **options}
    return Batcher(recorder, **options)


def hold_the_worker(batcher: Batcher[Any, Any], recorder: Recorder) -> Future[Any]:
    """A first job that holds the only worker in the recorder's first batch until its gate opens."""
    busy = batcher.submit(Job("busy", key="k"))
    recorder.wait_batches(1)
    return busy


def results(futures: Sequence[Future[Any]]) -> list[Any]:
    return [f.result(WAIT_S) for f in futures]


def test_jobs_queued_while_the_worker_is_busy_run_as_one_batch(recorder: Recorder) -> None:
    batcher = start(recorder)
    first = batcher.submit(Job("a", key="k"))
    recorder.wait_batches(1)  # the only worker is now held in the first batch
    queued = [batcher.submit(Job(p, key="k")) for p in "bcde"]
    recorder.gate.set()
    assert results([first, *queued]) == list("ABCDE")
    assert recorder.batches == [["a"], ["b", "c", "d", "e"]]
    stats = batcher.stats
    assert (stats.batches, stats.jobs, stats.rows, stats.largest_rows) == (2, 5, 5, 4)
    batcher.close()


def test_a_batch_holds_at_most_max_rows_rows(recorder: Recorder) -> None:
    batcher = start(recorder, max_rows=7)
    busy = hold_the_worker(batcher, recorder)
    queued = [batcher.submit(Job(f"j{i}", rows=3, key="k")) for i in range(5)]
    recorder.gate.set()
    results([busy, *queued])
    assert recorder.batches[1:] == [["j0", "j1"], ["j2", "j3"], ["j4"]]  # 6, 6 and 3 rows
    batcher.close()


def test_jobs_with_other_keys_never_share_a_batch_and_keep_their_order(recorder: Recorder) -> None:
    batcher = start(recorder)
    busy = hold_the_worker(batcher, recorder)
    queued = [batcher.submit(Job(p, key=k)) for p, k in
              (("a1", "a"), ("b1", "b"), ("a2", "a"), ("n1", None), ("a3", "a"), ("n2", None), ("b2", "b"))]
    recorder.gate.set()
    results([busy, *queued])
    assert recorder.batches[1:] == [["a1", "a2", "a3"], ["b1", "b2"], ["n1"], ["n2"]]
    batcher.close()


def test_a_cancelled_job_is_never_run(recorder: Recorder) -> None:
    batcher = start(recorder)
    busy = hold_the_worker(batcher, recorder)
    gone = batcher.submit(Job("gone", key="k"))
    kept = batcher.submit(Job("kept", key="k"))
    assert gone.cancel()
    recorder.gate.set()
    assert results([busy, kept]) == ["BUSY", "KEPT"]
    assert recorder.batches == [["busy"], ["kept"]]
    batcher.close()


def test_a_job_past_its_deadline_when_its_batch_forms_times_out_unrun(recorder: Recorder) -> None:
    clock = FakeMonotonic(100.0)
    batcher = start(recorder, monotonic=clock)
    hold_the_worker(batcher, recorder)
    late = batcher.submit(Job("late", key="k", deadline=105.0))
    on_time = batcher.submit(Job("on-time", key="k", deadline=200.0))
    clock.advance(10)  # "late" expires while it waits for the worker
    recorder.gate.set()
    with pytest.raises(TimeoutError):
        late.result(WAIT_S)
    assert on_time.result(WAIT_S) == "ON-TIME"
    assert recorder.batches == [["busy"], ["on-time"]]
    assert batcher.stats.expired == 1
    batcher.close()


def test_each_caller_gets_its_own_result_or_its_own_error() -> None:
    def run(payloads: Sequence[int]) -> list[Any]:
        return [ValueError(f"bad {p}") if p < 0 else p * 10 for p in payloads]

    batcher: Batcher[int, Any] = Batcher(run, workers=1, max_rows=8)
    futures = [batcher.submit(Job(p, key="k")) for p in (1, -2, 3)]
    assert futures[0].result(WAIT_S) == 10
    with pytest.raises(ValueError, match="bad -2"):
        futures[1].result(WAIT_S)
    assert futures[2].result(WAIT_S) == 30
    batcher.close()


def test_a_failing_batch_function_fails_every_job_of_the_batch_and_the_worker_goes_on() -> None:
    calls: list[list[str]] = []

    def run(payloads: Sequence[str]) -> list[str]:
        calls.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("the batch failed")
        return list(payloads)

    batcher: Batcher[str, str] = Batcher(run, workers=1, max_rows=8)
    with pytest.raises(RuntimeError, match="the batch failed"):
        batcher.submit(Job("boom")).result(WAIT_S)
    assert batcher.submit(Job("fine")).result(WAIT_S) == "fine"
    batcher.close()


def test_a_batch_function_with_the_wrong_number_of_results_fails_the_batch() -> None:
    batcher: Batcher[str, str] = Batcher(lambda payloads: [], workers=1, max_rows=8)
    with pytest.raises(RuntimeError, match="another number of results"):
        batcher.submit(Job("x")).result(WAIT_S)
    batcher.close()


def test_a_free_worker_waits_for_company_up_to_max_rows(recorder: Recorder) -> None:
    recorder.held = 0
    # a delay far longer than the test: the batch must form because it is full, not because time passed
    batcher = start(recorder, max_rows=3, max_delay_s=3600.0)
    futures = [batcher.submit(Job(p, key="k")) for p in "xyz"]
    assert results(futures) == ["X", "Y", "Z"]
    assert recorder.batches == [["x", "y", "z"]]
    batcher.close()


def test_a_lone_job_runs_once_the_delay_has_passed(recorder: Recorder) -> None:
    recorder.held = 0
    batcher = start(recorder, max_rows=3, max_delay_s=0.001)
    assert batcher.submit(Job("alone", key="k")).result(WAIT_S) == "ALONE"
    assert recorder.batches == [["alone"]]
    batcher.close()


def test_a_job_without_a_key_does_not_wait_for_company(recorder: Recorder) -> None:
    recorder.held = 0
    batcher = start(recorder, max_rows=3, max_delay_s=3600.0)
    assert batcher.submit(Job("solo")).result(WAIT_S) == "SOLO"
    batcher.close()


def test_close_fails_queued_jobs_and_refuses_new_ones(recorder: Recorder) -> None:
    batcher = start(recorder)
    busy = hold_the_worker(batcher, recorder)
    queued = batcher.submit(Job("queued", key="k"))
    batcher.close()
    with pytest.raises(NotReadyError):
        queued.result(WAIT_S)
    with pytest.raises(NotReadyError):
        batcher.submit(Job("late"))
    recorder.gate.set()
    assert busy.result(WAIT_S) == "BUSY"  # the running batch finishes
    assert recorder.batches == [["busy"]]


def test_several_workers_run_batches_side_by_side() -> None:
    recorder = Recorder(held=2)
    batcher = Batcher(recorder, workers=2, max_rows=8)
    a = batcher.submit(Job("a"))  # no key: each its own batch, whatever the workers' timing
    b = batcher.submit(Job("b"))
    recorder.wait_batches(2)  # both workers hold a batch at once
    recorder.gate.set()
    assert results([a, b]) == ["A", "B"]
    batcher.close()


def test_every_worker_runs_the_start_hook() -> None:
    started: list[str] = []
    lock = threading.Lock()

    def hook() -> None:
        with lock:
            started.append(threading.current_thread().name)

    batcher: Batcher[str, str] = Batcher(list, workers=3, max_rows=8, name="w", on_start=hook)
    wait_until(lambda: len(started) == 3, what="every worker to start")
    assert sorted(started) == ["w-0", "w-1", "w-2"]
    batcher.close()


@pytest.mark.parametrize("options", [{"workers": 0}, {"max_rows": 0}, {"max_delay_s": -1.0}])
def test_bad_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Batcher(list, **{"workers": 1, "max_rows": 8, **options})


def test_a_job_of_no_rows_is_refused() -> None:
    batcher: Batcher[str, str] = Batcher(list, workers=1, max_rows=8)
    with pytest.raises(ValueError):
        batcher.submit(Job("x", rows=0))
    batcher.close()


# -- the measured config's batching section ------------------------------------------------------------


def _config_with(batching: Any) -> dict[str, Any]:
    return {
        "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:eu-west-1:111122223333:key/k", "region": "eu-west-1",
        "encryption_context": {"model": "m", "version": "1"},
        "sealed_digest": "ab" * 32, "kms_ca_bundle": amazon_trust_services_pem(), "batching": batching,
    }


def test_the_batching_section_round_trips_and_defaults_are_on() -> None:
    config = EnclaveConfig.from_mapping(_config_with({"max_rows": 16, "max_delay_ms": 2.5,
                                                      "stream_interval_ms": 0}))
    assert config.batching == Batching(max_rows=16, max_delay_ms=2.5, stream_interval_ms=0)
    assert EnclaveConfig.from_mapping(json.loads(config.to_json())).batching == config.batching
    assert Batching().max_rows > 1  # batching is on unless the owner turns it off


@pytest.mark.parametrize("section", [
    {"max_rows": 0}, {"max_rows": 2.5}, {"max_rows": True}, {"max_delay_ms": -1}, {"max_delay_ms": 1001},
    {"max_delay_ms": "2"}, {"torch_threads": -1}, {"interop_threads": 0}, {"max_batch": 8}, "fast",
    {"stream_interval_ms": -1}, {"stream_interval_ms": 1001}, {"stream_interval_ms": True},
])
def test_a_bad_batching_section_is_refused_at_load(section: Any) -> None:
    with pytest.raises(ConfigError, match="Batching"):
        EnclaveConfig.from_mapping(_config_with(section))


@pytest.mark.parametrize(("batching", "workers", "vcpus", "threads"), [
    (Batching(), 2, 2, 1), (Batching(), 1, 4, 4), (Batching(), 3, 2, 1), (Batching(torch_threads=3), 2, 2, 3),
])
def test_torch_threads_split_the_vcpus_between_the_workers(
    batching: Batching, workers: int, vcpus: int, threads: int,
) -> None:
    assert batching.threads_per_worker(workers, vcpus) == threads
