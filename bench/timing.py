"""Per-call latency of a function, the one way every bench measures it: warm up, then time each call.

Medians and high percentiles of many single calls (``time.perf_counter_ns``), not a mean over a loop:
the quantity a caller feels, and robust to the odd scheduler hiccup on a shared CI machine.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence


def call_latencies_us(fn: Callable[[], object], n: int, *, warmup: int = 200) -> list[float]:
    """``n`` per-call latencies of ``fn`` in microseconds, sorted, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples.sort()
    return samples


def p50_us(fn: Callable[[], object], n: int, *, warmup: int = 200) -> float:
    """The median per-call latency of ``fn`` in microseconds."""
    return statistics.median(call_latencies_us(fn, n, warmup=warmup))


def p50_p99_us(fn: Callable[[], object], n: int, *, warmup: int = 200) -> tuple[float, float]:
    """The median and 99th-percentile per-call latency of ``fn`` in microseconds."""
    samples = call_latencies_us(fn, n, warmup=warmup)
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1, nearest rank) of latencies given in seconds, in milliseconds (3 decimals)."""
    ordered = sorted(latencies_s)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)


def concurrent_load(call_of: Callable[[int], Callable[[], object]], concurrency: int,
                    duration_s: float) -> tuple[float, list[float]]:
    """Calls per second and per-call latencies (seconds) of ``concurrency`` threads, thread ``i`` calling
    ``call_of(i)`` (each its own client) for ``duration_s`` after one warm-up call each."""
    latencies: list[float] = []
    lock = threading.Lock()
    bounds = [0.0, 0.0]  # start, stop: set once by the barrier's action, before any thread goes on

    def begin() -> None:
        bounds[0] = time.monotonic()
        bounds[1] = bounds[0] + duration_s

    ready = threading.Barrier(concurrency + 1, action=begin)

    def worker(i: int) -> None:
        call = call_of(i)
        call()  # warm up (a client also attests and verifies the enclave here)
        ready.wait()
        mine = []
        while time.monotonic() < bounds[1]:
            started = time.perf_counter()
            call()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    return len(latencies) / (time.monotonic() - bounds[0]), latencies
