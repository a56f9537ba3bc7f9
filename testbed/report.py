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


def _bytes(scaled: float, scale: float) -> str:
    real = scaled * scale
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if real >= factor:
            return f"{real / factor:.2f} {unit}"
    return f"{real:.0f} B"


def request_table(report: dict) -> str:
    """Per-hop bytes (real-cluster units, from interface counters) and timings."""
    spec, scale, c = report["spec"], report["scale"], report["counters"]
    pe_gpu, de_gpu = spec["prefill_gpu"], spec["decode_gpu"]
    hops = [
        ("storage -> PE node snic", c.get(f"{report['pe_node']}/snic/rx", 0)),
        ("storage -> DE node snic", c.get(f"{report['de_node']}/snic/rx", 0)),
        ("read node pcie -> PE GPU cnic (KV, low)", c.get(f"{pe_gpu}/cnic/rx/low", 0)),
        ("PE GPU cnic -> DE node pcie", c.get(f"{report['de_node']}/pcie/rx", 0)),
        ("PE GPU all-to-all (EF, high)", c.get(f"{pe_gpu}/cnic/tx/high", 0)),
        ("DE node pcie -> DE GPU cnic (H2D, low)", c.get(f"{de_gpu}/cnic/rx/low", 0)),
        ("DE node snic -> storage (writes)", c.get(f"{report['de_node']}/snic/tx", 0)),
    ]
    prefill, decode = report["prefill"], report["decode"]
    lines = [f"request {report['request']}: {spec['model']}, {spec['context']} hit + "
             f"{spec['append']} miss tokens, {spec['generate']} generated, path "
             f"{spec['path'].upper()}, {pe_gpu} -> {de_gpu} (scale {scale:g})",
             f"hit KV {_bytes(report['hit_kv_bytes'], scale)}, miss KV "
             f"{_bytes(report['miss_kv_bytes'], scale)}", "",
             table(["HOP (interface counters)", "BYTES (real)"],
                   [[name, _bytes(v, scale)] for name, v in hops]), ""]
    t = prefill["timings"]
    lines.append(table(["PHASE", "SECONDS"], [
        ["prefill total", f"{prefill['seconds']:.3f}"],
        ["  storage load", f"{t['load']:.3f}"],
        ["  waiting for layer KV", f"{t['layer_wait']:.3f}"],
        ["  compute", f"{t['compute']:.3f}"],
        ["  all-to-all", f"{t['all_to_all']:.3f}"],
        ["  KV push to DE (overlapped)", f"{t['push']:.3f}"],
        ["decode: prompt H2D", f"{decode['h2d_seconds']:.3f}"],
        ["decode: TPOT", f"{decode['tpot']:.4f}"],
        ["decode total", f"{decode['seconds']:.3f}"]]))
    verified = report["decode"]["verifier"]
    ok = all(report["read_back"].values())
    lines.append(f"\nprompt KV verified at the decode GPU: {verified['verified_blocks']} blocks, "
                 f"{verified['corrupt_bytes']} corrupt bytes; {len(report['read_back'])} "
                 f"persisted block copies read back {'identical' if ok else 'DIFFERENT'}")
    return "\n".join(lines)
