"""Per-call latency of a function, the one way every bench measures it: warm up, then time each call.

Medians and high percentiles of many single calls (``time.perf_counter_ns``), not a mean over a loop:
the quantity a caller feels, and robust to the odd scheduler hiccup on a shared CI machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
