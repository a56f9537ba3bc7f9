"""iperf3 between emulated hosts: the reference measurement for the emulated links.

Flows are marked with a DSCP (iperf3 --tos) so that they land in the class under test.
Rates are taken on the receiving side, from the server's own JSON report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from subprocess import PIPE, Popen

from testbed.errors import TestbedError
from testbed.hosts import NetnsHost


@dataclass
class FlowResult:
    bits_per_second: float                   # received, over the whole run less `omit`
    intervals: list[tuple[float, float]]     # (start seconds, received bits/s)


class Flow:
    """One iperf3 TCP flow from `sender` to `receiver`'s address, started now."""

    def __init__(self, sender: NetnsHost, receiver: NetnsHost, address: str, seconds: float,
                 dscp: int | None = None, port: int = 5201, interval: float = 0.1,
                 omit: float = 0.0):
        self.started = time.monotonic()
        self.server: Popen = receiver.popen(
            ["iperf3", "-s", "-1", "-J", "-p", str(port), "-i", str(interval)],
            stdout=PIPE, stderr=PIPE)
        self._wait_listening(receiver, port)
        cmd = ["iperf3", "-c", address, "-p", str(port), "-t", str(seconds), "-J"]
        if dscp is not None:
            cmd += ["-S", str(dscp << 2)]
        self.client: Popen = sender.popen(cmd, stdout=PIPE, stderr=PIPE)
        self.omit = omit

    @staticmethod
    def _wait_listening(receiver: NetnsHost, port: int) -> None:
        for _ in range(100):
            if f":{port} " in receiver.cmd("ss -Hltn"):
                return
            time.sleep(0.02)
        raise TestbedError(f"iperf3 server on {receiver.name}:{port} did not start")

    def wait(self, timeout: float = 60) -> FlowResult:
        client_out, client_err = self.client.communicate(timeout=timeout)
        server_out, _ = self.server.communicate(timeout=timeout)
        self.ended = time.monotonic()
        try:
            report = json.loads(server_out)
        except ValueError:
            raise TestbedError(f"iperf3 gave no report: {client_err.decode()[-200:]}") from None
        if "error" in report:
            raise TestbedError(f"iperf3: {report['error']}")
        sums = [i["sum"] for i in report["intervals"]]
        # Leave out the first `omit` seconds (TCP slow start, not the link), and weigh each
        # interval by its length: the last one is often a short tail.
        kept = [s for s in sums if s["start"] >= self.omit - 1e-6]
        seconds = sum(s["seconds"] for s in kept)
        rate = 8 * sum(s["bytes"] for s in kept) / seconds if seconds else 0.0
        intervals = [(s["start"], s["bits_per_second"]) for s in sums]
        return FlowResult(rate, intervals)


def measure(sender: NetnsHost, receiver: NetnsHost, address: str, seconds: float = 4,
            dscp: int | None = None, omit: float = 1.0, port: int = 5201) -> float:
    """Received bits/s of one saturating TCP flow."""
    return Flow(sender, receiver, address, seconds + omit, dscp, port, omit=omit).wait().bits_per_second
