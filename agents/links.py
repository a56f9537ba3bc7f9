"""Whether an interface of this host has a live link, as its own agent sees it.

An ioctl on a socket answers for the network namespace the agent runs in (sysfs would
answer for whichever namespace mounted it). A link whose far end is down (a veth whose
peer, the switch port, was set down) loses IFF_RUNNING.
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40


def link_up(ifname: str) -> bool:
    """True when `ifname` is up and has carrier; False when either is missing or it does not
    exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sH14x", ifname.encode()[:15], 0))
        except OSError:
            return False
    [flags] = struct.unpack_from("H", reply, 16)
    return bool(flags & IFF_UP and flags & IFF_RUNNING)
