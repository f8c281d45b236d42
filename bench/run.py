"""Run every benchmark module and print one JSON object per result (``python -m bench.run [NAME...]``).

Discovers ``bench/bench_*.py`` modules, each exposing ``run() -> Iterator[dict]``. Positional
arguments select modules by name (``envelope`` or ``bench_envelope``). A module that raises is
reported as a JSON line with ``error`` and the exit status becomes 1; the others still run.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Module names (``bench_*``) in this folder, sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    wanted = {
        a if a.startswith("bench_") else f"bench_{a}" for a in (argv if argv is not None else sys.argv[1:])
    }
    names = [n for n in discover() if not wanted or n in wanted]
    if wanted - set(names):
        print(f"unknown benchmark module(s): {sorted(wanted - set(names))}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
            for result in module.run():
                print(json.dumps({"module": name, **result}, sort_keys=True), flush=True)
        except Exception as exc:  # report and go on with the other modules
            traceback.print_exc(file=sys.stderr)
            print(json.dumps({"module": name, "error": type(exc).__name__}), flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
