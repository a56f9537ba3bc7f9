"""Link and HTB class counters from rtnetlink, decoding only the attributes the exporter needs.

pyroute2 opens the socket inside each host's namespace (`pyroute2.netns`), but its general
message decoder costs about a millisecond per message: one scrape a second of a 2P4D x 8
fabric (some 130 class dumps and a link dump) took a third of a core. A dump here is one
request on a raw NETLINK_ROUTE socket and a struct walk of the replies for the two or three
attributes read (linux/rtnetlink.h, if_link.h, pkt_sched.h, gen_stats.h).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

from pyroute2 import netns

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_GETLINK, RTM_GETQDISC, RTM_GETTCLASS = 18, 38, 42
TC_H_ROOT = 0xFFFFFFFF
IFLA_IFNAME, IFLA_STATS64 = 3, 23
TCA_STATS2 = 7
TCA_STATS_BASIC, TCA_STATS_QUEUE = 1, 3
NLA_TYPE_MASK = 0x3FFF                      # without the nested / byte-order flags

HEADER = struct.Struct("=IHHII")            # nlmsghdr: length, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")        # family, type, index, flags, change
TCMSG = struct.Struct("=BxxxiIII")          # family, ifindex, handle, parent, info
ATTRIBUTE = struct.Struct("=HH")            # rtattr: length, type
LINK_STATS = struct.Struct("=QQQQ")         # rtnl_link_stats64: rx/tx packets, rx/tx bytes
BASIC = struct.Struct("=QI")                # gnet_stats_basic: bytes, packets
QUEUE = struct.Struct("=IIIII")             # gnet_stats_queue: qlen, backlog, drops, requeues, overlimits
RECEIVE_BYTES = 1 << 16


def attributes(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + ATTRIBUTE.size <= len(data):
        length, kind = ATTRIBUTE.unpack_from(data, offset)
        if length < ATTRIBUTE.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + ATTRIBUTE.size:offset + length]
        offset += (length + 3) & ~3


class RtnlSocket:
    """A NETLINK_ROUTE socket in one network namespace (a path such as /proc/PID/ns/net;
    None: this process's)."""

    def __init__(self, namespace: str | None = None):
        if namespace:
            netns.pushns(namespace)      # the socket belongs to the namespace it is made in
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        finally:
            if namespace:
                netns.popns()
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def dump(self, message_type: int, body: bytes) -> Iterator[bytes]:
        """The payload of every reply to a dump request, until NLMSG_DONE."""
        self.seq += 1
        self.sock.send(HEADER.pack(HEADER.size + len(body), message_type,
                                   NLM_F_REQUEST | NLM_F_DUMP, self.seq, 0) + body)
        while True:
            data, offset = self.sock.recv(RECEIVE_BYTES), 0
            while offset + HEADER.size <= len(data):
                length, kind, _flags, seq, _pid = HEADER.unpack_from(data, offset)
                payload = data[offset + HEADER.size:offset + length]
                offset += (length + 3) & ~3
                if seq != self.seq:
                    continue                         # a late reply to an earlier request
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"netlink dump {message_type}: "
                                            f"{errno.errorcode.get(code, code)}")
                    return
                yield payload

    def links(self) -> Iterator[tuple[int, str, tuple | None]]:
        """Every interface: (index, name, rtnl_link_stats64's first four fields or None)."""
        for payload in self.dump(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            name = stats = None
            for kind, value in attributes(payload, IFINFOMSG.size):
                if kind == IFLA_IFNAME:
                    name = value.rstrip(b"\0").decode()
                elif kind == IFLA_STATS64:
                    stats = LINK_STATS.unpack_from(value)
            if name:
                yield IFINFOMSG.unpack_from(payload)[2], name, stats

    def link_counters(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """Every interface: ((rx bytes, rx packets), (tx bytes, tx packets))."""
        found = {}
        for _index, name, stats in self.links():
            if stats:
                rx_packets, tx_packets, rx_bytes, tx_bytes = stats
                found[name] = ((rx_bytes, rx_packets), (tx_bytes, tx_packets))
        return found

    def class_counters(self, index: int) -> dict[int, dict[str, int]]:
        """The traffic classes of one interface, by handle: bytes, packets, drops, overlimits,
        backlog."""
        found = {}
        for payload in self.dump(RTM_GETTCLASS, TCMSG.pack(socket.AF_UNSPEC, index, 0, 0, 0)):
            handle = TCMSG.unpack_from(payload)[2]
            stats = {}
            for kind, value in attributes(payload, TCMSG.size):
                if kind != TCA_STATS2:
                    continue
                for inner, data in attributes(value, 0):
                    if inner == TCA_STATS_BASIC:
                        stats["bytes"], stats["packets"] = BASIC.unpack_from(data)
                    elif inner == TCA_STATS_QUEUE:
                        _qlen, backlog, drops, _requeues, overlimits = QUEUE.unpack_from(data)
                        stats.update(backlog=backlog, drops=drops, overlimits=overlimits)
            if len(stats) == 5:
                found[handle] = stats
        return found

    def root_qdiscs(self, handle: int) -> dict[int, tuple[int, int]]:
        """Every interface's root qdisc of this `handle`, by interface index: (bytes sent,
        bytes queued), in one dump of the whole namespace."""
        found = {}
        for payload in self.dump(RTM_GETQDISC, TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _family, index, qdisc, parent, _info = TCMSG.unpack_from(payload)
            if qdisc != handle or parent != TC_H_ROOT:
                continue
            sent = queued = None
            for kind, value in attributes(payload, TCMSG.size):
                if kind == TCA_STATS2:
                    for inner, data in attributes(value, 0):
                        if inner == TCA_STATS_BASIC:
                            sent = BASIC.unpack_from(data)[0]
                        elif inner == TCA_STATS_QUEUE:
                            queued = QUEUE.unpack_from(data)[1]
            if sent is not None and queued is not None:
                found[index] = (sent, queued)
        return found

    def indexes(self) -> dict[str, int]:
        """Every interface's index, by name."""
        return {name: index for index, name, _stats in self.links()}
