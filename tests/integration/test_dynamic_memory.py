"""A memory dump of a dynamic-weights process holds at most the budget of plaintext blocks, and none
between calls: the test plays the attacker with ``/proc/PID/mem``.

``memory_probe.py`` unseals the demo MiniLM the way the enclave's boot does and serves commands; this
test reads every anonymous mapping of that process (heap, anonymous memory, stacks: plaintext weights
are never file-backed there) and searches it for 16-byte windows sampled from every tensor the weights
policy keeps encrypted (64 per tensor, 36 tensors over 6 blocks). The resident-mode process is the
control: there, every block's windows are found, so a clean scan means the bytes are absent, not that
the scanner is blind.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from enclave_app.config import WeightsPolicy
from enclave_app.models import ModelHandler
from enclave_app.weights import handler_module, select
from nitrovault.envelope import seal_file
from nitrovault.local.models import demo_handler, demo_model_source, with_metadata

HERE = Path(__file__).resolve().parent
WINDOWS = 64  # sampled per tensor
WIDTH = 16  # bytes per window
CHUNK = 64 << 20


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("sealed")
    source, metadata = demo_model_source()
    plain = folder / "m.safetensors"
    with_metadata(source, plain, metadata)
    key = secrets.token_bytes(32)
    seal_file(plain, folder / "m.sealed", data_key=key, wrapped_key=b"w", key_id="k",
              encryption_context={"model": "m", "version": "1"})
    plain.unlink()
    return folder / "m.sealed", key


@pytest.fixture(scope="module")
def windows() -> dict[bytes, int]:
    """The packaged MiniLM's :func:`windows_of`: what the probe unseals."""
    return windows_of(demo_handler())


def windows_of(handler: ModelHandler) -> dict[bytes, int]:
    """16-byte windows of every dynamic tensor → its block's index (windows that occur in two blocks,
    or are all zeros, are left out: they would not name one block)."""
    module = handler_module(handler)
    rng = np.random.default_rng(0)
    found: dict[bytes, int] = {}
    ambiguous: set[bytes] = set()
    for index, (_, params) in enumerate(select(module, WeightsPolicy(mode="dynamic")).items()):
        for _, param in params:
            data = param.detach().numpy().tobytes()
            for offset in rng.integers(0, (len(data) - WIDTH) // 4, WINDOWS) * 4:
                window = data[offset:offset + WIDTH]
                if not any(window) or found.get(window, index) != index:
                    ambiguous.add(window)
                found[window] = index
    for window in ambiguous:
        found.pop(window, None)
    assert len(set(found.values())) == 6
    return found


class Probe:
    """The stand-in enclave process, driven line by line."""

    def __init__(self, sealed: tuple[Path, bytes], mode: str, budget: int = 1) -> None:
        path, key = sealed
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "memory_probe.py"), str(path), mode, str(budget)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE.parents[1])
        self.send(key.hex(), expect="ready")

    def send(self, line: str, *, expect: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        got = self.process.stdout.readline().strip()
        assert got == expect, f"probe said {got!r}, not {expect!r}"

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def _anonymous_regions(pid: int) -> Iterator[tuple[int, int]]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        span, perms = fields[0], fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if "r" not in perms or (name and name not in ("[heap]", "[stack]") and not name.startswith("[anon")):
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        yield start, end


def blocks_in_memory(pid: int, windows: dict[bytes, int]) -> set[int]:
    """The blocks whose windows occur anywhere in ``pid``'s anonymous memory (4-byte aligned)."""
    heads = np.array(sorted({np.frombuffer(w[:8], "<u8")[0] for w in windows}), dtype="<u8")
    hits: set[int] = set()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for start, end in _anonymous_regions(pid):
            for at in range(start, end, CHUNK):
                try:
                    data = os.pread(fd, min(CHUNK, end - at) + WIDTH, at)
                except OSError:
                    continue
                for shift in (0, 4):
                    usable = (len(data) - shift) // 8 * 8
                    words = np.frombuffer(data, "<u8", usable // 8, shift)
                    where = np.searchsorted(heads, words).clip(0, len(heads) - 1)
                    for i in np.flatnonzero(heads[where] == words):
                        offset = shift + 8 * int(i)
                        block = windows.get(data[offset:offset + WIDTH])
                        if block is not None:
                            hits.add(block)
    finally:
        os.close(fd)
    return hits


@pytest.fixture
def probes(sealed: tuple[Path, bytes]) -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for probe in made:
        probe.close()


def test_resident_weights_are_all_in_memory_the_scanners_control(
        sealed: tuple[Path, bytes], windows: dict[bytes, int], probes: list[Probe]) -> None:
    probes.append(probe := Probe(sealed, "resident"))
    probe.send("embed", expect="done")
    assert blocks_in_memory(probe.process.pid, windows) == set(range(6))


@pytest.mark.parametrize("budget", [1, 2])
def test_dynamic_weights_leave_no_block_in_memory_between_calls_and_the_budget_during_one(
        sealed: tuple[Path, bytes], windows: dict[bytes, int], probes: list[Probe], budget: int) -> None:
    probes.append(probe := Probe(sealed, "dynamic", budget))
    pid = probe.process.pid
    assert blocks_in_memory(pid, windows) == set()  # after boot and warm-up
    probe.send("embed", expect="done")
    assert blocks_in_memory(pid, windows) == set()  # after serving
    probe.send("pause 3", expect="paused")
    during = blocks_in_memory(pid, windows)
    assert 3 in during and during <= {3, 4} and len(during) <= budget, during
    probe.send("resume", expect="done")
    assert blocks_in_memory(pid, windows) == set()
