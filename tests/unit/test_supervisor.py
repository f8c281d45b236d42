"""Enclave supervision: backoff schedule, reset after a stable run, clean stop, nitro-cli argv."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from fakes import FakeMonotonic, run_async

from nitrovault.errors import ConfigError
from parent_app.supervisor import (
    ENCLAVE_ENDED,
    BackoffPolicy,
    CommandResult,
    NitroCliError,
    NitroCliLauncher,
    NitroEnclave,
    ProcessLauncher,
    Supervisor,
    SupervisorState,
    enclave_is_running,
    parse_run_enclave_output,
    run_enclave_argv,
    terminate_enclave_argv,
)

START_FAILS = "start-fails"
WAIT_FAILS = "wait-fails"


@dataclass
class FakeLauncher:
    """Each script item is ``(uptime, exit_code)``, START_FAILS or WAIT_FAILS; then it runs until stopped."""

    clock: FakeMonotonic
    script: list[tuple[float, int] | str]
    starts: int = 0
    stopped: list[int] = field(default_factory=list)
    started_event: asyncio.Event = field(default_factory=asyncio.Event)
    _release: dict[int, asyncio.Event] = field(default_factory=dict)

    async def start(self) -> int:
        self.starts += 1
        self.started_event.set()
        idx = self.starts - 1
        if idx < len(self.script) and self.script[idx] == START_FAILS:
            raise OSError("no enclave for you")
        return idx

    async def wait(self, handle: int) -> int:
        if handle < len(self.script):
            item = self.script[handle]
            if item == WAIT_FAILS:
                raise RuntimeError("lost it")
            assert isinstance(item, tuple)
            uptime, code = item
            self.clock.now += uptime
            await asyncio.sleep(0)
            return code
        ev = self._release.setdefault(handle, asyncio.Event())
        await ev.wait()
        return -15

    async def stop(self, handle: int) -> None:
        self.stopped.append(handle)
        self._release.setdefault(handle, asyncio.Event()).set()


async def _run_until(sup: Supervisor, launcher: FakeLauncher, starts: int) -> asyncio.Task[None]:
    task = asyncio.create_task(sup.run())
    async with asyncio.timeout(30):
        while launcher.starts < starts or sup.state is not SupervisorState.RUNNING:
            await asyncio.sleep(0)
    return task


def _supervisor(clock: FakeMonotonic, launcher: FakeLauncher, **kw: object) -> Supervisor:
    return Supervisor(launcher, clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]


@run_async
async def test_restart_delays_follow_the_exponential_schedule() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [(1.0, 3)] * 8)
    sup = _supervisor(clock, launcher)
    task = await _run_until(sup, launcher, 9)
    assert clock.slept == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert sup.delays == clock.slept
    assert sup.restarts == 8
    assert sup.last_exit_code == 3
    await sup.stop()
    await task
    assert sup.state is SupervisorState.STOPPED
    assert launcher.stopped == [8]
    assert sup.last_exit_code == -15


@run_async
async def test_custom_factor_and_cap() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [(0.0, 1)] * 4)
    sup = _supervisor(clock, launcher, backoff_initial=1, backoff_max=5, backoff_factor=3)
    task = await _run_until(sup, launcher, 5)
    assert clock.slept == [1, 3, 5, 5]
    await sup.stop()
    await task


@run_async
async def test_a_stable_run_resets_the_backoff() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [(1, 1), (1, 1), (60, 1), (1, 1), (1, 1)])
    sup = _supervisor(clock, launcher, stable_after=60)
    task = await _run_until(sup, launcher, 6)
    assert clock.slept == [0.5, 1, 0.5, 1, 2]
    await sup.stop()
    await task


@run_async
async def test_a_run_just_short_of_stable_does_not_reset() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [(1, 1), (1, 1), (59.9, 1)])
    sup = _supervisor(clock, launcher, stable_after=60)
    task = await _run_until(sup, launcher, 4)
    assert clock.slept == [0.5, 1, 2]
    await sup.stop()
    await task


@run_async
async def test_start_failures_back_off_too() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [START_FAILS, START_FAILS, (1, 7)])
    sup = _supervisor(clock, launcher)
    task = await _run_until(sup, launcher, 4)
    assert clock.slept == [0.5, 1, 2]
    assert sup.last_exit_code == 7
    await sup.stop()
    await task


@run_async
async def test_a_failing_wait_stops_the_enclave_and_backs_off() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [WAIT_FAILS])
    sup = _supervisor(clock, launcher)
    task = await _run_until(sup, launcher, 2)
    assert launcher.stopped[0] == 0
    assert clock.slept == [0.5]
    assert sup.last_exit_code is None
    await sup.stop()
    await task


@run_async
async def test_states_are_reported_in_order() -> None:
    clock = FakeMonotonic()
    seen: list[SupervisorState] = []
    launcher = FakeLauncher(clock, [(1, 2)])
    sup = _supervisor(clock, launcher, on_state=seen.append)
    task = await _run_until(sup, launcher, 2)
    await sup.stop()
    await task
    S = SupervisorState
    assert seen == [S.STARTING, S.RUNNING, S.BACKOFF, S.STARTING, S.RUNNING, S.STOPPED]


@run_async
async def test_stop_during_backoff_returns_promptly_without_restart() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [(1, 1)])
    never = asyncio.Event()

    async def forever(_: float) -> None:
        await never.wait()

    sup = Supervisor(launcher, clock=clock, sleep=forever)
    task = asyncio.create_task(sup.run())
    async with asyncio.timeout(5):
        while sup.state is not SupervisorState.BACKOFF:
            await asyncio.sleep(0)
    async with asyncio.timeout(1):
        await sup.stop()
    await task
    assert sup.state is SupervisorState.STOPPED  # type: ignore[comparison-overlap]  # mypy keeps the narrowing
    assert launcher.starts == 1


@run_async
async def test_stop_before_run_means_run_returns_at_once() -> None:
    clock = FakeMonotonic()
    launcher = FakeLauncher(clock, [])
    sup = _supervisor(clock, launcher)
    await sup.stop()
    async with asyncio.timeout(1):
        await sup.run()
    assert launcher.starts == 0
    assert sup.state is SupervisorState.STOPPED


def test_backoff_policy_validation_and_no_overflow() -> None:
    with pytest.raises(ConfigError):
        BackoffPolicy(initial=0)
    with pytest.raises(ConfigError):
        BackoffPolicy(initial=5, maximum=1)
    with pytest.raises(ConfigError):
        BackoffPolicy(factor=0.5)
    assert BackoffPolicy().delay(10_000) == 30.0
    assert BackoffPolicy(factor=1).delay(10_000) == 0.5


# -- ProcessLauncher (a real process) -------------------------------------------------------------------


@run_async
async def test_process_launcher_reports_exit_code_and_is_restarted() -> None:
    launcher = ProcessLauncher([sys.executable, "-c", "import sys; sys.exit(3)"])
    restarted_twice = asyncio.Event()
    sup: Supervisor

    def on_state(_: SupervisorState) -> None:  # every transition: woken by the state, not by a timer
        if sup.restarts >= 2 and sup.last_exit_code == 3:
            restarted_twice.set()

    sup = Supervisor(launcher, backoff_initial=0.01, backoff_max=0.02, on_state=on_state)
    task = asyncio.create_task(sup.run())
    async with asyncio.timeout(60):  # generous: three real process starts on a loaded machine
        await restarted_twice.wait()
    assert sup.delays[:2] == [0.01, 0.02]
    await sup.stop()
    await task
    assert sup.state is SupervisorState.STOPPED


@run_async
async def test_process_launcher_stop_terminates_a_running_process(tmp_path: object) -> None:
    launcher = ProcessLauncher(
        [sys.executable, "-c", "import os, time; print(os.environ['NV_X'], flush=True); time.sleep(60)"],
        env={"NV_X": "1", "PATH": "/usr/bin:/bin"},
        stop_timeout=2,
    )
    proc = await launcher.start()
    async with asyncio.timeout(5):
        await launcher.stop(proc)
        code = await launcher.wait(proc)
    assert code == -signal.SIGTERM
    await launcher.stop(proc)  # idempotent


def test_process_launcher_needs_argv() -> None:
    with pytest.raises(ConfigError):
        ProcessLauncher([])


# -- NitroCliLauncher -------------------------------------------------------------------------------------

RUN_OUTPUT = (
    b"Start allocating memory...\nStarted enclave with enclave-cid: 16, memory: 2048 MiB, cpu-ids: [1, 3]\n"
    + json.dumps(
        {
            "EnclaveName": "nv",
            "EnclaveID": "i-0abc-enc0123456789",
            "ProcessID": 7077,
            "EnclaveCID": 16,
            "NumberOfCPUs": 2,
            "CPUIDs": [1, 3],
            "MemoryMiB": 2048,
        },
        indent=2,
    ).encode()
)


def _describe(*states: str) -> bytes:
    return json.dumps([{"EnclaveID": "i-0abc-enc0123456789", "State": s} for s in states]).encode()


def test_run_enclave_argv() -> None:
    assert run_enclave_argv("/opt/nv.eif", 2, 2048, 16) == [
        "nitro-cli",
        "run-enclave",
        "--eif-path",
        "/opt/nv.eif",
        "--cpu-count",
        "2",
        "--memory",
        "2048",
        "--enclave-cid",
        "16",
    ]


def test_debug_console_adds_debug_mode_flag() -> None:
    assert run_enclave_argv("/opt/nv.eif", 2, 2048, 16, unsafe_debug_console=True)[-1] == "--debug-mode"
    assert "--debug-mode" not in run_enclave_argv("/opt/nv.eif", 2, 2048, 16)


@pytest.mark.parametrize(
    ("eif", "cpus", "mem", "cid"),
    [
        ("", 2, 2048, 16),
        ("/x.eif", 0, 2048, 16),
        ("/x.eif", 2, 32, 16),
        ("/x.eif", 2, 2048, 3),
        ("/x.eif", 2, 2048, 2**32),
    ],
)
def test_run_enclave_argv_rejects_bad_values(eif: str, cpus: int, mem: int, cid: int) -> None:
    with pytest.raises(ConfigError):
        run_enclave_argv(eif, cpus, mem, cid)


def test_terminate_argv_rejects_option_like_ids() -> None:
    assert terminate_enclave_argv("i-1-enc2") == [
        "nitro-cli",
        "terminate-enclave",
        "--enclave-id",
        "i-1-enc2",
    ]
    with pytest.raises(ConfigError):
        terminate_enclave_argv("--all")


def test_parse_outputs() -> None:
    assert parse_run_enclave_output(RUN_OUTPUT) == NitroEnclave("i-0abc-enc0123456789", 16)
    with pytest.raises(NitroCliError):
        parse_run_enclave_output(b"Error: out of memory\n")
    with pytest.raises(NitroCliError):
        parse_run_enclave_output(b'{"EnclaveCID": 16}')
    assert enclave_is_running(_describe("RUNNING"), "i-0abc-enc0123456789")
    assert not enclave_is_running(_describe("TERMINATING"), "i-0abc-enc0123456789")
    assert not enclave_is_running(b"[]", "i-0abc-enc0123456789")


class FakeNitroCli:
    def __init__(self, describes: Sequence[bytes], run_rc: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.describes = list(describes)
        self.run_rc = run_rc

    async def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        if argv[1] == "run-enclave":
            return CommandResult(self.run_rc, RUN_OUTPUT if self.run_rc == 0 else b"", b"")
        if argv[1] == "describe-enclaves":
            return CommandResult(0, self.describes.pop(0), b"")
        return CommandResult(0, b"{}", b"")


@run_async
async def test_nitro_cli_launcher_lifecycle(caplog: pytest.LogCaptureFixture) -> None:
    cli = FakeNitroCli([_describe("RUNNING"), b"not json", _describe("RUNNING"), b"[]"])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    launcher = NitroCliLauncher("/opt/nv.eif", 2, 2048, 16, runner=cli, sleep=sleep, poll_interval=3)
    with caplog.at_level(logging.WARNING):
        handle = await launcher.start()
    assert not [r for r in caplog.records if "unsafe_debug_console" in r.getMessage()]
    assert handle == NitroEnclave("i-0abc-enc0123456789", 16)
    assert cli.calls[0][:2] == ["nitro-cli", "run-enclave"]
    assert await launcher.wait(handle) == ENCLAVE_ENDED
    assert slept == [3, 3, 3]
    await launcher.stop(handle)
    assert cli.calls[-1] == ["nitro-cli", "terminate-enclave", "--enclave-id", "i-0abc-enc0123456789"]


@run_async
async def test_nitro_cli_debug_console_warns_on_every_start(caplog: pytest.LogCaptureFixture) -> None:
    cli = FakeNitroCli([])
    launcher = NitroCliLauncher("/opt/nv.eif", 2, 2048, 16, unsafe_debug_console=True, runner=cli)
    with caplog.at_level(logging.WARNING):
        await launcher.start()
        await launcher.start()
    warnings = [r for r in caplog.records if "unsafe_debug_console" in r.getMessage()]
    assert len(warnings) == 2
    assert cli.calls[0][-1] == "--debug-mode"


@run_async
async def test_nitro_cli_run_failure_raises() -> None:
    launcher = NitroCliLauncher("/opt/nv.eif", 2, 2048, 16, runner=FakeNitroCli([], run_rc=1))
    with pytest.raises(NitroCliError):
        await launcher.start()
