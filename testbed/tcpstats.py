"""TCP segments that the emulated hosts' kernels resent, from each host's own SNMP counters.

The fabric loses almost nothing unless a fault takes a link away (its queues hold whatever
the senders' windows allow; one 1P2D run in about eight resent a segment after a real loss),
so outside faults a resent segment is nearly always spurious: bytes on a link that the
paper's lossless RDMA fabric would not carry (testbed/hosts.py, host_sysctls).
"""

from __future__ import annotations

from pathlib import Path

from testbed.state import FabricRecord


def resent_segments(record: FabricRecord) -> int:
    """The sum over hosts of Tcp RetransSegs (/proc/<pid>/net/snmp of a process in each
    host's network namespace); a host that is gone counts nothing."""
    total = 0
    for host in record.hosts:
        try:
            lines = Path(f"/proc/{host.pid}/net/snmp").read_text().splitlines()
        except OSError:
            continue
        names, values = (line.split() for line in lines if line.startswith("Tcp:"))
        total += int(dict(zip(names, values))["RetransSegs"])
    return total
