"""``ensure_loopback_up`` for real, in fresh network namespaces (``unshare --net``), where ``lo`` starts down
as it does in an enclave. Skipped, with the reason, only where ``unshare`` is missing or not permitted.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from nitrovault.errors import NetworkSetupError
from nitrovault.transport.loopback import ensure_loopback_up

# Runs inside the new namespace: the state before, two calls, lo's IPv4 address and mask (SIOCGIFADDR,
# SIOCGIFNETMASK), and a real TCP round trip over 127.0.0.1 and another address of 127.0.0.0/8.
PROBE = textwrap.dedent("""
    import fcntl, json, socket, struct
    from nitrovault.errors import NetworkSetupError
    from nitrovault.transport.loopback import IFF_UP, SIOCGIFFLAGS, ensure_loopback_up

    def ifreq(code):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return fcntl.ioctl(s.fileno(), code, struct.pack("16s24x", b"lo"))

    def ipv4(code):
        try:
            return socket.inet_ntoa(ifreq(code)[20:24])  # sockaddr_in.sin_addr inside the union
        except OSError:
            return None

    def round_trip(host):
        with socket.create_server((host, 0)) as server:
            with socket.create_connection(server.getsockname()) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"ping")
                    return peer.recv(4).decode()

    out = {"up_before": bool(struct.unpack("16sH22x", ifreq(SIOCGIFFLAGS))[1] & IFF_UP),
           "addr_before": ipv4(0x8915)}
    try:
        out["first"] = ensure_loopback_up()
        out["second"] = ensure_loopback_up()
    except NetworkSetupError as err:
        out["error"] = str(err)
    else:
        out["addr"], out["mask"] = ipv4(0x8915), ipv4(0x891B)
        out["echo"] = [round_trip("127.0.0.1"), round_trip("127.9.9.9")]
    print(json.dumps(out))
""")

# drop CAP_NET_ADMIN (from the bounding set, so root's exec cannot regain it), still in the new namespace;
# the uid stays, so the checkout stays readable wherever it is (a clean clone may be in a 0700 folder)
WITHOUT_NET_ADMIN = [
    "setpriv",
    "--inh-caps=-all",
    "--bounding-set=-net_admin",
]


@functools.cache
def _unshare_refusal() -> str | None:
    """Why ``unshare --net`` cannot be used here, or None when it works."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    try:
        done = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unshare --net failed to run: {err}"
    if done.returncode != 0:
        return f"unshare --net is not permitted here: {done.stderr.decode(errors='replace').strip()}"
    return None


def probe(prefix: list[str] | None = None) -> dict[str, object]:
    refusal = _unshare_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    done = subprocess.run(
        ["unshare", "--net", "--", *(prefix or []), sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_brings_lo_up_in_a_fresh_namespace_and_the_kernel_gives_it_127_0_0_1_8() -> None:
    out = probe()
    assert out["up_before"] is False
    assert out["addr_before"] is None  # no address while down: nothing could listen on 127.0.0.1
    assert out["first"] is True  # it changed the state
    assert out["second"] is False  # and is idempotent
    assert out["addr"] == "127.0.0.1"
    assert out["mask"] == "255.0.0.0"
    assert out["echo"] == ["ping", "ping"]  # 127.0.0.1 and the rest of 127.0.0.0/8 route locally


def test_without_cap_net_admin_it_raises_a_clear_network_setup_error() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) is not installed")
    out = probe(WITHOUT_NET_ADMIN)
    assert out["up_before"] is False
    assert "CAP_NET_ADMIN" in str(out["error"])
    assert str(out["error"]).startswith("cannot bring interface lo up: not permitted")


def test_an_interface_that_is_up_is_left_alone_without_privilege() -> None:
    # this test process's own namespace has lo up already (every test over 127.0.0.1 relies on it)
    assert ensure_loopback_up() is False


@pytest.mark.parametrize("name", ["", "x" * 16, "lo\x00"])
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(NetworkSetupError, match="bad interface name"):
        ensure_loopback_up(name)


def test_a_missing_interface_is_a_network_setup_error() -> None:
    with pytest.raises(NetworkSetupError, match="no such interface"):
        ensure_loopback_up("nv-absent0")
