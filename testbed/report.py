"""Plain-text tables for the terminal."""

from __future__ import annotations

from testbed.rates import format_rate
from testbed.state import FabricRecord


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fabric_table(record: FabricRecord) -> str:
    rows = []
    for host in record.hosts:
        for intf in host.interfaces:
            shaped = intf["rate"] is not None
            rows.append([
                host.name, host.role, intf["name"], intf["fabric"],
                f"{intf['address']}/{intf['prefixlen']}",
                format_rate(intf["rate"]) if shaped else "unshaped",
                format_rate(intf["real_rate"]) if shaped else "-",
                "EF high / CS1 low" if intf["prioritized"] else "-"])
    return table(["HOST", "ROLE", "IFACE", "FABRIC", "ADDRESS", "SHAPED", "REAL", "CLASSES"],
                 rows)
