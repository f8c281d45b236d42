"""Process supervision for the local stack: spawn, wait until ready, stop every child, on any signal.

Each stand-in (KMS emulator, state store, NSM service, parent) is a child process in its own session
(so a Ctrl-C at the terminal reaches only the stack, which then stops them in order) with its output in
``HOME/logs/NAME.log``. Readiness is a line in that log (``ready``, a regex): the child prints it once it
listens, so nothing here guesses with a delay.

Invariants:

* every child :meth:`Processes.spawn` started is ended by :meth:`Processes.close` (terminate, wait, then
  kill), newest first, whatever step failed;
* :func:`interrupt_on_sigterm` turns SIGTERM (and SIGHUP) into the same ``KeyboardInterrupt`` a Ctrl-C
  raises, so ``kill PID`` of ``nitrovault local up`` stops every child exactly as Ctrl-C does instead
  of leaving the KMS emulator, the parent and the enclave running;
* a child that exits before it is ready fails its step at once, naming its log.

Waiting is polling a log or a status file at a short interval, bounded by a timeout: the children are
separate programs that report by writing files, which is what an operator would read too.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from nitrovault.local.homes import StackError

__all__ = ["Processes", "find_pids", "interrupt_on_sigterm", "wait_for_status"]

#: how often a wait looks again at a log or a status file
POLL_S = 0.05


class Processes:
    """The children of one local stack, with their logs in ``logs``."""

    def __init__(self, logs: Path, cwd: Path) -> None:
        self.logs = logs
        self.cwd = cwd
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], *, ready: re.Pattern[str],
              timeout: float) -> tuple[subprocess.Popen[bytes], re.Match[str]]:
        """Start ``argv`` with its output in ``logs/NAME.log``; wait until the log matches ``ready``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log:
            start = log.tell()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                    start_new_session=True)
        self.children.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with log_path.open("rb") as f:
                f.seek(start)
                match = ready.search(f.read().decode(errors="replace"))
            if match:
                return proc, match
            if proc.poll() is not None:
                raise StackError(name, f"exited with code {proc.returncode}; see {log_path}")
            time.sleep(POLL_S)
        raise StackError(name, f"not ready after {timeout:.0f}s; see {log_path}")

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Supervise a child started elsewhere (the state store starts its own server)."""
        self.children.append(proc)

    def exited(self) -> bool:
        """Whether any child has ended."""
        return any(p.poll() is not None for p in self.children)

    def wait_any(self) -> None:
        """Block until a child ends (or a signal interrupts: Ctrl-C, or SIGTERM under
        :func:`interrupt_on_sigterm`)."""
        while not self.exited():
            time.sleep(10 * POLL_S)

    def close(self, timeout: float = 30.0) -> None:
        """Terminate every child, newest first; kill what has not ended after ``timeout`` seconds (the
        parent drains its enclaves on SIGTERM: their final audit checkpoints take a moment)."""
        for proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.children):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread (as Ctrl-C does)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_status(status_file: Path, done: Callable[[Mapping[str, Any]], bool], *, step: str,
                    timeout: float, processes: Processes | None = None) -> Mapping[str, Any]:
    """The parent's status report once ``done(report)`` holds (e.g. SERVING); a FAILED report, an exited
    child or the timeout fail ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            status: Mapping[str, Any] = json.loads(status_file.read_text())
            if done(status):
                return status
            if status["state"] == "FAILED":
                raise StackError(step, f"enclave refused to serve at step {status['step']}: "
                                       f"{status['reason']}")
        if processes is not None and processes.exited():
            raise StackError(step, f"a local process exited; see {processes.logs}")
        time.sleep(2 * POLL_S)
    raise StackError(step, f"no such report in {status_file} after {timeout:.0f}s")


def find_pids(module: bytes, marker: bytes) -> list[int]:
    """Pids of processes whose command line holds both ``module`` and ``marker`` (as ``pgrep -f`` would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if module in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids
