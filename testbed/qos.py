"""Link shaping and priority queuing, set over netlink with pyroute2.

Every shaped link end gets an HTB root (handle 1:) whose class 1:1 holds the link rate. A
CNIC end splits 1:1 into a high class 1:10 (prio 0, DSCP EF: model-execution traffic) and a
low class 1:11 (prio 1, DSCP CS1 and anything unmarked: KV traffic), each guaranteed its QoS
share and allowed to borrow up to the link rate, like the paper's InfiniBand VL arbiter.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.errors import TestbedError
from testbed.topology import QosShares

DSCP_EF = 46   # expedited forwarding: model-execution traffic
DSCP_CS1 = 8   # class selector 1: KV-cache traffic
ETH_P_IP = 0x0800
ROOT, LINK_CLASS, HIGH_CLASS, LOW_CLASS = 0x10000, 0x10001, 0x10010, 0x10011
GSO_MAX = 65536            # a veth hands HTB segments of up to 64 KiB
KERNEL_QUANTUM_MAX = 200_000  # above this the kernel warns "quantum of class is big"


@dataclass(frozen=True)
class HtbParams:
    """HTB numbers chosen for one rate (bits/s), so that any rate up to 10 Gbit/s works."""
    rate: int

    @property
    def bytes_per_second(self) -> int:
        return self.rate // 8

    @property
    def burst(self) -> int:
        # Enough tokens for two GSO segments or 2 ms at the rate, whichever is more: a
        # smaller bucket cannot release a 64 KiB segment without falling below the rate.
        return max(2 * GSO_MAX, self.bytes_per_second // 500)

    @property
    def quantum(self) -> int:
        return min(KERNEL_QUANTUM_MAX, max(GSO_MAX // 4, self.bytes_per_second // 1000))

    @property
    def r2q(self) -> int:
        # Used only for classes without an explicit quantum; keeps rate/r2q in range.
        return max(1, self.bytes_per_second // KERNEL_QUANTUM_MAX + 1)


def _tos_key(dscp: int) -> str:
    """u32 key matching the DSCP bits (top six) of the IPv4 TOS byte, at header offset 1."""
    return f"0x{dscp << 2:02x}/0xfc+1"


def shape(ipr: IPRoute, ifname: str, rate: int, qos: QosShares | None) -> None:
    """Replace the egress qdisc of `ifname` with our HTB tree. `qos` adds the two classes."""
    try:
        index = ipr.link_lookup(ifname=ifname)[0]
    except IndexError:
        raise TestbedError(f"cannot shape {ifname}: no such interface") from None
    link = HtbParams(rate)
    try:
        ipr.tc("add", "htb", index, ROOT, default=(LOW_CLASS if qos else LINK_CLASS) & 0xFFFF,
               r2q=link.r2q)
        _add_class(ipr, index, LINK_CLASS, ROOT, rate, rate, prio=0)
        if qos:
            _add_class(ipr, index, HIGH_CLASS, LINK_CLASS, int(rate * qos.high), rate, prio=0)
            _add_class(ipr, index, LOW_CLASS, LINK_CLASS, int(rate * qos.low), rate, prio=1)
            for dscp, target in ((DSCP_EF, HIGH_CLASS), (DSCP_CS1, LOW_CLASS)):
                ipr.tc("add-filter", "u32", index, parent=ROOT, prio=1,
                       protocol=ETH_P_IP, target=target, keys=[_tos_key(dscp)])
    except NetlinkError as exc:
        raise TestbedError(f"cannot shape {ifname} to {rate} bit/s: {exc}") from None


def set_rate(ipr: IPRoute, ifname: str, rate: int, qos: QosShares | None) -> None:
    """Change the rate of a shaped link end in place (a fault: a slowed or restored link);
    the classes keep their handles, so traffic flows on without a gap."""
    try:
        index = ipr.link_lookup(ifname=ifname)[0]
    except IndexError:
        raise TestbedError(f"cannot change the rate of {ifname}: no such interface") from None
    try:
        _add_class(ipr, index, LINK_CLASS, ROOT, rate, rate, prio=0, command="change-class")
        if qos:
            _add_class(ipr, index, HIGH_CLASS, LINK_CLASS, int(rate * qos.high), rate, prio=0,
                       command="change-class")
            _add_class(ipr, index, LOW_CLASS, LINK_CLASS, int(rate * qos.low), rate, prio=1,
                       command="change-class")
    except NetlinkError as exc:
        raise TestbedError(f"cannot change {ifname} to {rate} bit/s: {exc}") from None


def _add_class(ipr: IPRoute, index: int, handle: int, parent: int, rate: int, ceil: int,
               prio: int, command: str = "add-class") -> None:
    guaranteed, ceiling = HtbParams(max(rate, 8_000)), HtbParams(ceil)
    ipr.tc(command, "htb", index, handle, parent=parent,
           rate=guaranteed.bytes_per_second, ceil=ceiling.bytes_per_second,
           burst=ceiling.burst, cburst=ceiling.burst, quantum=ceiling.quantum, prio=prio)
