"""The report's account of a scenario's faults: every issued turn completed or failed (and
why), and every fault injected, with its time."""

from __future__ import annotations

import re
from collections import Counter

from testbed.report import table

REASONS_SHOWN = 8


def _aps(value) -> str:
    return "-" if value is None else f"{value:g}"


def accounting_text(summaries: list[dict]) -> str:
    return ("Accounting: every issued turn completed (all its prompt bytes verified) or "
            "failed with a reason:\n"
            + table(["TOPOLOGY", "POLICY", "APS", "ISSUED", "COMPLETED", "FAILED",
                     "UNACCOUNTED", "UNVERIFIED"],
                    [[s["topology"], s["policy"], _aps(s["aps"]), str(s["issued"]),
                      str(s["turns"]), str(s["failed"]), str(s["unaccounted"]),
                      str(s["unverified"])] for s in summaries]))


def reason_kind(reason: str) -> str:
    """A reason with its addresses, request ids and times blanked, so that alike failures
    count together."""
    reason = re.sub(r"\b\d+\.\d+\.\d+\.\d+\b", "<address>", reason)
    return re.sub(r"\b\d{5,}\b|\b\d+\.\d+\b", "#", reason)[:200]


def failures_text(results: list[dict]) -> str:
    counts = Counter((r["topology"], r["policy"], reason_kind(f["reason"]))
                     for r in results for f in r.get("failures", []))
    if not counts:
        return ""
    rows = [[topology, policy, str(n), reason]
            for (topology, policy, reason), n in counts.most_common(REASONS_SHOWN)]
    more = len(counts) - REASONS_SHOWN
    return ("Failed turns, by reason (all in failures.csv):\n"
            + table(["TOPOLOGY", "POLICY", "TURNS", "REASON"], rows)
            + (f"\n... and {more} more reasons" if more > 0 else ""))


def faults_text(results: list[dict]) -> str:
    rows = [[r["topology"], r["policy"], f"{e['t']:.1f} s", e["action"], e["source"],
             "ok" if e["error"] is None else f"FAILED: {e['error']}"]
            for r in results for e in r.get("faults", [])]
    if not rows:
        return ""
    return (f"Faults injected ({len(rows)}):\n"
            + table(["TOPOLOGY", "POLICY", "AT", "ACTION", "FROM", "RESULT"], rows))
