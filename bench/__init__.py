"""Benchmarks: each ``bench/bench_*.py`` has ``run() -> Iterator[dict]``; ``python -m bench.run`` runs all.

Every result dict has ``name``, the measured figures, ``ratio`` and (where one is set) ``target``.
"""
