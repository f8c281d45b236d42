"""Bring the loopback interface up, as an enclave must before its KMS forwarder can listen on 127.0.0.1.

A Nitro Enclave (like a fresh network namespace) starts with ``lo`` down, and the enclave image has no
``ip`` binary, so this sets the flag with the two ioctls ``ip link set lo up`` uses: ``SIOCGIFFLAGS``
reads the interface flags, ``SIOCSIFFLAGS`` writes them back with ``IFF_UP`` added (``netdevice(7)``).
Once ``lo`` is up the kernel gives it ``127.0.0.1/8`` (and ``::1``) by itself; nothing else to configure.

Hand-written because it is two ioctls on a ``struct ifreq`` (a 16-byte name, then a union whose first
member is the ``short`` flags; 40 bytes on 64-bit Linux), and a netlink library would grow the measured
image for nothing. Needs ``CAP_NET_ADMIN`` in the namespace only while ``lo`` is down: reading the flags
of an interface that is already up needs no privilege, so calling it twice, or in a namespace someone
else set up, is fine.

Example (``unshare --net`` as root: ``lo`` starts down)::

    ensure_loopback_up()   # True: it was down, now up with 127.0.0.1/8
    ensure_loopback_up()   # False: already up
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

from nitrovault.errors import NetworkSetupError

SIOCGIFFLAGS = 0x8913  #: <linux/sockios.h>
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1  #: <linux/if.h>
IFNAMSIZ = 16
_IFREQ = "16sH22x"  # ifr_name, ifr_flags, the rest of the union: sizeof(struct ifreq) == 40


def network_interfaces() -> list[str]:
    """Interfaces of *this process's* network namespace (``/sys/class/net`` shows the mount's, not ours)."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def _flags(sock: socket.socket, name: bytes) -> int:
    answer = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack(_IFREQ, name, 0))
    return int(struct.unpack(_IFREQ, answer)[1])


def ensure_loopback_up(name: str = "lo") -> bool:
    """Set ``IFF_UP`` on ``name`` in this process's network namespace.

    True if this brought it up, False if it was up already. :class:`NetworkSetupError` when it cannot:
    no such interface, or it is down and this process lacks ``CAP_NET_ADMIN`` (``EPERM``).
    """
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"\x00" in raw:
        raise NetworkSetupError(f"bad interface name {name!r}")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            flags = _flags(sock, raw)
            if flags & IFF_UP:
                return False
            fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(_IFREQ, raw, flags | IFF_UP))
            if not _flags(sock, raw) & IFF_UP:
                raise NetworkSetupError(f"interface {name} is still down after setting IFF_UP")
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EACCES):
            why = "not permitted (bringing an interface up needs CAP_NET_ADMIN in this network namespace)"
        elif err.errno == errno.ENODEV:
            why = "no such interface in this network namespace"
        else:
            why = err.strerror or type(err).__name__
        raise NetworkSetupError(f"cannot bring interface {name} up: {why}") from None
    return True
