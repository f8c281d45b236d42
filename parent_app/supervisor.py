"""Start, watch and restart the enclave, with exponential backoff.

The parent is untrusted; supervision is about availability only. Nothing here sees a payload, a key or
a measurement: a launcher starts *something* and reports when it ended.

Invariants:

* At most one enclave (one launcher handle) is alive per :class:`Supervisor`.
* Restart delays follow :class:`BackoffPolicy` exactly: ``initial * factor**(n-1)`` capped at
  ``maximum`` for the n-th consecutive failure; a run that stayed up ``stable_after`` seconds resets
  the count, so the next delay is ``initial`` again. A launcher whose ``start`` raises counts as a
  failure too (state goes to BACKOFF, never a crash loop without delay).
* Time is a parameter (``clock``, ``sleep``), so the schedule is unit-tested without waiting.
* :meth:`Supervisor.stop` stops the enclave (``launcher.stop``) and returns only when the run loop
  has ended; the state is then STOPPED. :meth:`Supervisor.drain` restarts nothing any more and waits
  (bounded) for the enclave to end on its own before it stops it.
* Commands are argv lists, never a shell string. A debug-console enclave is only started through
  the parameter named ``unsafe_debug_console``, and each start logs a warning: debug enclaves have
  all-zero PCRs, so a correctly written key policy refuses them, and the console leaks their output.

Example (a process that exits with 3 is restarted after 0.5 s, 1 s, ...)::

    launcher = ProcessLauncher([sys.executable, "-c", "import sys; sys.exit(3)"])
    sup = Supervisor(launcher)
    task = asyncio.create_task(sup.run())
    ...
    await sup.stop()        # sup.state is SupervisorState.STOPPED, sup.last_exit_code == 3
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from nitrovault.errors import ConfigError, NitrovaultError

log = logging.getLogger(__name__)

H = TypeVar("H")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class EnclaveLauncher(Protocol[H]):
    """Starts one enclave and tells when it ended. Implementations: Nitro CLI, a local process, fakes."""

    async def start(self) -> H:
        """Start an enclave and return a handle for it; raise if it could not be started."""
        ...

    async def wait(self, handle: H) -> int:
        """Return the exit code once the enclave has ended (negative: killed by that signal)."""
        ...

    async def stop(self, handle: H) -> None:
        """Ask the enclave to end; idempotent; ``wait`` returns afterwards."""
        ...


class SupervisorState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class BackoffPolicy:
    """Restart delays (pure).

    initial: delay after the first failure, seconds.
    maximum: cap on any delay, seconds.
    factor: growth per consecutive failure.
    stable_after: a run at least this long (seconds) resets the failure count.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    stable_after: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or self.stable_after < 0:
            raise ConfigError("backoff needs 0 < initial <= maximum, factor >= 1, stable_after >= 0")

    def delay(self, failures: int) -> float:
        """Delay before the restart that follows the ``failures``-th consecutive failure (>= 1)."""
        exponent = max(failures - 1, 0)
        # Compare in log space so a long failure streak cannot overflow the float.
        if self.factor > 1 and exponent > 64:
            return self.maximum
        return float(min(self.initial * self.factor**exponent, self.maximum))

    def failures_after(self, failures: int, uptime: float | None) -> int:
        """Consecutive failure count after a run of ``uptime`` seconds (``None``: never started)."""
        if uptime is not None and uptime >= self.stable_after:
            return 1
        return failures + 1


class Supervisor:
    """Keeps one enclave running: start, wait, back off, restart; :meth:`stop` ends it all."""

    def __init__(
        self,
        launcher: EnclaveLauncher[Any],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        backoff_factor: float = 2.0,
        stable_after: float = 60.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        on_state: Callable[[SupervisorState], None] | None = None,
    ) -> None:
        self._launcher = launcher
        self.policy = BackoffPolicy(backoff_initial, backoff_max, backoff_factor, stable_after)
        self._clock = clock
        self._sleep = sleep
        self._on_state = on_state
        self._state = SupervisorState.STOPPED
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._running = False
        self._retiring = False
        #: exit code of the enclave's last run (``None`` before the first exit or when start failed)
        self.last_exit_code: int | None = None
        #: how many times the enclave was started after the first start
        self.restarts = 0
        #: consecutive failures counted by the backoff policy
        self.failures = 0
        #: delays slept in BACKOFF, in order (for metrics and tests)
        self.delays: list[float] = []

    @property
    def state(self) -> SupervisorState:
        return self._state

    def _set_state(self, state: SupervisorState) -> None:
        if state is not self._state:
            self._state = state
            log.info("enclave supervisor state: %s", state.value)
            if self._on_state is not None:
                self._on_state(state)

    async def run(self) -> None:
        """Run until :meth:`stop`. Call once."""
        if self._running:
            raise RuntimeError("Supervisor.run() is already running")
        self._running = True
        self._done.clear()
        started_once = False
        try:
            while not self._stopping.is_set():
                self._set_state(SupervisorState.STARTING)
                if started_once:
                    self.restarts += 1
                started_once = True
                uptime = await self._run_once()
                if self._stopping.is_set() or self._retiring:
                    break
                self.failures = self.policy.failures_after(self.failures, uptime)
                delay = self.policy.delay(self.failures)
                self.delays.append(delay)
                self._set_state(SupervisorState.BACKOFF)
                log.warning(
                    "enclave ended (exit code %s, failure %d); restarting in %.2fs",
                    self.last_exit_code,
                    self.failures,
                    delay,
                )
                await self._until_stopped(self._sleep(delay))
        finally:
            self._running = False
            self._set_state(SupervisorState.STOPPED)
            self._done.set()

    async def _run_once(self) -> float | None:
        """One start/wait cycle; returns the uptime, or ``None`` when the start itself failed."""
        try:
            handle = await self._launcher.start()
        except Exception as exc:  # any launcher failure means "back off and retry", never a dead loop
            log.error("enclave failed to start: %s", type(exc).__name__)
            self.last_exit_code = None
            return None
        started = self._clock()
        self._set_state(SupervisorState.RUNNING)
        waiter = asyncio.ensure_future(self._launcher.wait(handle))
        try:
            await self._until_stopped(waiter, cancel=False)
            if not waiter.done():
                await self._launcher.stop(handle)
            self.last_exit_code = await waiter
        except asyncio.CancelledError:
            waiter.cancel()
            with contextlib.suppress(Exception):
                await self._launcher.stop(handle)
            raise
        except Exception as exc:
            log.error("lost track of the enclave: %s; stopping it", type(exc).__name__)
            self.last_exit_code = None
            with contextlib.suppress(Exception):
                await self._launcher.stop(handle)
        return self._clock() - started

    async def _until_stopped(self, aw: Awaitable[Any], *, cancel: bool = True) -> None:
        """Wait for ``aw`` or for :meth:`stop`, whichever comes first."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if cancel and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def drain(self, timeout: float) -> bool:
        """Restart no more; let the running enclave end on its own (it was told to drain) for at most
        ``timeout`` seconds, then :meth:`stop` it. ``True`` if it ended on its own (or none was running)."""
        self._retiring = True
        if not self._running:
            return True
        if self._state is not SupervisorState.RUNNING:  # starting or backing off: nothing to wait for
            await self.stop()
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), timeout)
            return True
        except TimeoutError:
            if timeout > 0:
                log.warning("enclave did not end within the %.0f s drain bound; stopping it", timeout)
            await self.stop()
            return False

    async def stop(self) -> None:
        """Stop the enclave and the loop; returns once the state is STOPPED."""
        self._stopping.set()
        if self._running:
            await self._done.wait()


# -- launchers ------------------------------------------------------------------------------------------


class ProcessLauncher:
    """Runs the enclave as a local process (the local stand-in; see ``nitrovault.local``'s isolation).

    The process gets its own session so that :meth:`stop` (SIGTERM, then SIGKILL after
    ``stop_timeout``) reaches its children too.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        *,
        stop_timeout: float = 5.0,
    ) -> None:
        if not argv:
            raise ConfigError("ProcessLauncher needs a non-empty argv")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_timeout = stop_timeout

    async def start(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, start_new_session=True
        )

    async def wait(self, handle: asyncio.subprocess.Process) -> int:
        return await handle.wait()

    async def stop(self, handle: asyncio.subprocess.Process) -> None:
        if handle.returncode is not None:
            return
        _signal_group(handle.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(handle.wait()), self.stop_timeout)
        except TimeoutError:
            _signal_group(handle.pid, signal.SIGKILL)
            await handle.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes


Runner = Callable[[Sequence[str]], Awaitable[CommandResult]]


async def run_command(argv: Sequence[str]) -> CommandResult:
    """Run ``argv`` (no shell) and collect its output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return CommandResult(proc.returncode if proc.returncode is not None else -1, out, err)


@dataclass(frozen=True)
class NitroEnclave:
    """Handle of an enclave started by ``nitro-cli run-enclave``."""

    enclave_id: str
    cid: int


#: ``nitro-cli`` does not report an enclave's exit status: an enclave that vanished "exited" with this.
ENCLAVE_ENDED = 1


class NitroCliLauncher:
    """Runs a real Nitro Enclave with ``nitro-cli`` (argv lists only, never a shell).

    eif_path: the enclave image file.
    cpu_count, memory_mib: resources carved out of the parent (``--cpu-count``, ``--memory`` in MiB).
    enclave_cid: the enclave's vsock CID (>= 4; 0-3 are reserved, 3 is the parent).
    unsafe_debug_console: adds ``--debug-mode``; the enclave's PCRs are then all zero, so KMS must refuse
        it its key, and its console output is readable from the parent. Logs a warning on every start.
    poll_interval: seconds between ``describe-enclaves`` polls in :meth:`wait`.
    runner, sleep: I/O seams (tests pass fakes).
    """

    def __init__(
        self,
        eif_path: str,
        cpu_count: int,
        memory_mib: int,
        enclave_cid: int,
        *,
        unsafe_debug_console: bool = False,
        nitro_cli: str = "nitro-cli",
        poll_interval: float = 2.0,
        runner: Runner = run_command,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.argv = run_enclave_argv(
            eif_path,
            cpu_count,
            memory_mib,
            enclave_cid,
            unsafe_debug_console=unsafe_debug_console,
            nitro_cli=nitro_cli,
        )
        self.unsafe_debug_console = unsafe_debug_console
        self.nitro_cli = nitro_cli
        self.poll_interval = poll_interval
        self._run = runner
        self._sleep = sleep

    async def start(self) -> NitroEnclave:
        if self.unsafe_debug_console:
            log.warning(
                "starting the enclave with unsafe_debug_console: its PCRs are all zero and its console "
                "is readable from the parent; never do this in production"
            )
        result = await self._run(self.argv)
        if result.returncode != 0:
            raise NitroCliError(f"nitro-cli run-enclave failed with exit code {result.returncode}")
        return parse_run_enclave_output(result.stdout)

    async def wait(self, handle: NitroEnclave) -> int:
        while True:
            result = await self._run(describe_enclaves_argv(self.nitro_cli))
            if result.returncode == 0:
                try:
                    if not enclave_is_running(result.stdout, handle.enclave_id):
                        return ENCLAVE_ENDED
                except NitroCliError:
                    log.warning("nitro-cli describe-enclaves answered unreadable output; polling again")
            await self._sleep(self.poll_interval)

    async def stop(self, handle: NitroEnclave) -> None:
        result = await self._run(terminate_enclave_argv(handle.enclave_id, self.nitro_cli))
        if result.returncode != 0:
            log.warning("nitro-cli terminate-enclave failed with exit code %d", result.returncode)


class NitroCliError(NitrovaultError):
    step = "nitro-cli"


def run_enclave_argv(
    eif_path: str,
    cpu_count: int,
    memory_mib: int,
    enclave_cid: int,
    *,
    unsafe_debug_console: bool = False,
    nitro_cli: str = "nitro-cli",
) -> list[str]:
    """``nitro-cli run-enclave --eif-path P --cpu-count N --memory MiB --enclave-cid CID [--debug-mode]``."""
    if not eif_path or "\x00" in eif_path:
        raise ConfigError("eif_path must be a non-empty path")
    for name, value, low in (("cpu_count", cpu_count, 1), ("memory_mib", memory_mib, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(enclave_cid, bool) or not isinstance(enclave_cid, int) or not 4 <= enclave_cid < 2**32 - 1:
        raise ConfigError(f"enclave_cid must be in 4..2**32-2 (0-3 are reserved), got {enclave_cid!r}")
    argv = [
        nitro_cli,
        "run-enclave",
        "--eif-path",
        eif_path,
        "--cpu-count",
        str(cpu_count),
        "--memory",
        str(memory_mib),
        "--enclave-cid",
        str(enclave_cid),
    ]
    if unsafe_debug_console:
        argv.append("--debug-mode")
    return argv


def terminate_enclave_argv(enclave_id: str, nitro_cli: str = "nitro-cli") -> list[str]:
    if not enclave_id or enclave_id.startswith("-"):
        raise ConfigError("enclave id must be non-empty and not look like an option")
    return [nitro_cli, "terminate-enclave", "--enclave-id", enclave_id]


def describe_enclaves_argv(nitro_cli: str = "nitro-cli") -> list[str]:
    return [nitro_cli, "describe-enclaves"]


def _json_document(stdout: bytes) -> Any:
    # nitro-cli may print progress lines (which can contain brackets) before its JSON answer, which
    # starts on a line of its own.
    text = stdout.decode("utf-8", "replace")
    start = re.search(r"^[\[{]", text, re.MULTILINE)
    if start is None:
        raise NitroCliError("nitro-cli printed no JSON")
    try:
        return json.JSONDecoder().raw_decode(text, start.start())[0]
    except ValueError as exc:
        raise NitroCliError("nitro-cli printed malformed JSON") from exc


def parse_run_enclave_output(stdout: bytes) -> NitroEnclave:
    """The handle from ``run-enclave``'s JSON (``EnclaveID``, ``EnclaveCID``)."""
    doc = _json_document(stdout)
    if not isinstance(doc, dict):
        raise NitroCliError("nitro-cli run-enclave did not answer a JSON object")
    enclave_id, cid = doc.get("EnclaveID"), doc.get("EnclaveCID")
    if not isinstance(enclave_id, str) or not enclave_id or not isinstance(cid, int):
        raise NitroCliError("nitro-cli run-enclave answer lacks EnclaveID/EnclaveCID")
    return NitroEnclave(enclave_id, cid)


def enclave_is_running(stdout: bytes, enclave_id: str) -> bool:
    """Whether ``describe-enclaves`` lists ``enclave_id`` in state RUNNING."""
    doc = _json_document(stdout)
    if not isinstance(doc, list):
        raise NitroCliError("nitro-cli describe-enclaves did not answer a JSON list")
    return any(
        isinstance(e, dict) and e.get("EnclaveID") == enclave_id and e.get("State") == "RUNNING" for e in doc
    )
