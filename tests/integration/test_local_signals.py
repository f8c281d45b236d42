"""``nitrovault local up`` stops every process it started on SIGTERM, exactly as on Ctrl-C.

The children run in their own sessions (so a terminal's Ctrl-C reaches only the stack, which stops them
in order); a plain ``kill`` of the stack used to end it without that cleanup, leaving the KMS emulator,
the state store, the NSM, the parent and the enclave running.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nitrovault.local.homes import free_port
from nitrovault.local.stack import REPO_ROOT

pytestmark = pytest.mark.slow


def _descendants(root: int) -> dict[int, bytes]:
    """Every live descendant of ``root`` (by parent pid), with its command line."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, bytes] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                frontier.append(child)
    return found


def _wait_exited(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], 60)
    finally:
        os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_local_up_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    home = tmp_path / "home"
    up = subprocess.Popen(
        [sys.executable, "-m", "nitrovault", "local", "up", "--home", str(home), "--model", "digits",
         "--listen", f"127.0.0.1:{free_port()}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            output.append(line)
            if "Ctrl-C stops the stack" in line:
                break
        else:
            pytest.fail("local up ended before serving:\n" + "".join(output))
        children = _descendants(up.pid)
        kinds = (b"local\x00kms", b"redis-server", b"nsm_service", b"nitrovault.local.parent",
                 b"nitrovault.local.enclave")
        # the KMS emulator, the state store, the NSM, the parent and the enclave are all running
        assert all(any(k in cmd for cmd in children.values()) for k in kinds), children
        up.send_signal(sig)
        rest, _ = up.communicate(timeout=120)
        output.append(rest)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 0, "".join(output)
    assert "stopping" in "".join(output)
    for pid in children:
        _wait_exited(pid)  # returns at once for an ended process; bounded for a survivor
    survivors = {pid: cmd for pid in children if (cmd := _cmdline(pid))}
    assert not survivors, survivors


def _cmdline(pid: int) -> bytes:
    """The command line of a live process; empty once it has ended (or is a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
