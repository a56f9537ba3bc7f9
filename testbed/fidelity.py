"""The fidelity verdict: whether a run measured the emulated cluster or the host under it.

A 2-core host that falls behind stretches every figure without a word. Like Mininet-HiFi
(CoNEXT'12), each run is judged by invariants that hold only while the emulation keeps up,
sampled at SAMPLE_HZ while the workload runs:

  host CPU headroom   the host's CPU idle share is at least CPU_IDLE_MIN in at least
                      CPU_WINDOWS_MIN of the 1 s windows
  link pace           while a shaped link is backlogged throughout a window (PACE_SAMPLES, or
                      long enough for PACE_SEGMENTS of the largest segment a veth hands HTB,
                      at slow dilated rates), its HTB root sends at least LINK_PACE_MIN of the
                      rate it was given, give or take the one segment in flight: a link that
                      does not keep pace is slowed by the host, not by its shaping
  kernel lateness     the 99th percentile of how late an emulated GPU kernel ends, before
                      any make-up and beyond the idle host's timer granularity
                      (agents/gpu.py), as a share of the kernel's time, is at
                      most KERNEL_LATENESS_MAX; the percentile is of GPU time (each kernel
                      weighs the time it took, lateness included), so 99% of the GPU's time
                      ran in kernels that late at most. Lateness over 1 s windows of each
                      engine's kernels is kept beside it (agents/fidelity.py,
                      KernelLateness): make bench-dilation found it no better a judge; so
                      is each kernel's (lateness, time), to judge again past another timer
                      granularity (LatenessPairs)
  event-loop lag      every agent's (and the client's) 99th-percentile event-loop lag is at
                      most LOOP_LAG_MAX emulated seconds, over time (each probe weighs the
                      time it slept, so a long stall counts for its whole length); an agent
                      that does not report its loop fails it, unless a fault stopped it
  agent CPU           every agent's (and the client's) CPU share, taken over 1 s windows of
                      wall time, is at most AGENT_CPU_MAX at the 99th percentile over time:
                      an agent is one process on one thread, and one busy most of the time
                      queues its frames behind each other, a delay the loop-lag probe does
                      not see (its wake-ups find short callbacks)

A run is VALID when every invariant holds, else INVALID naming each failed one with its
figure. Windows are wall seconds, where the host's limits live; lag is in emulated seconds.
The thresholds, and the runs that set them, are in the README ("Virtual time").
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from agents.fidelity import LatenessPairs, Quantiles
from testbed.cpuwatch import cpu_times
from testbed.qos import GSO_MAX, ROOT
from testbed.rtnl import RtnlSocket
from testbed.state import FabricRecord

SAMPLE_HZ = 10
WINDOW_SECONDS = 1.0
CPU_IDLE_MIN = 0.20
CPU_WINDOWS_MIN = 0.95
LINK_PACE_MIN = 0.95
# "Backlogged throughout" is read from samples: a link busy a share b of the time shows a
# backlog at all n samples of a window with probability b**n. At 10 samples a link busy 70%
# of the time passes for backlogged in 2.8% of windows, and its 70% for slowness (ablation's
# prefill CNIC, sending a layer's KV in bursts: 5 of 178 windows at 71%); at 20, in 0.08%.
PACE_SAMPLES = 20
# HTB sends whole segments of up to GSO_MAX bytes, so a window's byte count is off by up to
# one: a window holds at least this many, so that one is a small share of it.
PACE_SEGMENTS = 20
KERNEL_LATENESS_MAX = 0.10     # set by make bench-dilation: see the README
LOOP_LAG_MAX = 0.020
AGENT_CPU_MAX = 0.35           # set by make bench-dilation: see the README
QUANTILE = 0.99


@dataclass(frozen=True)
class LinkEnd:
    """One shaped end of a link: the host's end shapes what it sends, the switch port what
    it receives."""
    host: str
    nic: str
    direction: str                  # "tx" (the host's end) or "rx" (its switch port)
    namespace: str                  # key of the socket that reads it
    index: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.nic} {self.direction}"


@dataclass
class Check:
    name: str
    passed: bool
    figure: str                     # what was measured, against what it needs
    value: float | None = None
    # The histograms the figure was read from (agents/fidelity.py, Quantiles.to_json), by
    # agent or "all": enough to judge the run again at another quantile or threshold.
    histograms: dict[str, dict] | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.figure}"


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary(self) -> str:
        """'VALID' or 'INVALID: <each failed check and its figure>'."""
        if self.valid:
            return "VALID"
        return "INVALID: " + "; ".join(str(c) for c in self.checks if not c.passed)

    def to_json(self) -> dict:
        return {"valid": self.valid, "summary": self.summary(),
                "checks": [asdict(c) for c in self.checks]}


def windows(samples: list[tuple], seconds: float = WINDOW_SECONDS) -> list[list[tuple]]:
    """Consecutive, non-overlapping runs of samples (each starting with its time) spanning at
    least `seconds` each; a window shares its first sample with the previous one's last."""
    found, start = [], 0
    for i in range(1, len(samples)):
        if samples[i][0] - samples[start][0] >= seconds - 1e-3:     # float sums of periods
            found.append(samples[start:i + 1])
            start = i
    return found


def cpu_check(samples: list[tuple[float, int, int]]) -> Check:
    """samples: (time, busy jiffies, total jiffies)."""
    idle = [1 - (w[-1][1] - w[0][1]) / (w[-1][2] - w[0][2])
            for w in windows(samples) if w[-1][2] > w[0][2]]
    if not idle:
        return Check("host CPU headroom", False, "no 1 s window sampled")
    share = sum(i >= CPU_IDLE_MIN for i in idle) / len(idle)
    return Check("host CPU headroom", share >= CPU_WINDOWS_MIN,
                 f"idle >= {CPU_IDLE_MIN:.0%} in {share:.1%} of {len(idle)} 1 s windows "
                 f"(needs {CPU_WINDOWS_MIN:.0%})", share)


def link_check(series: dict[str, list[tuple[float, int, int, int | None]]]) -> Check:
    """series: per link end, (time, bytes sent, bytes queued, intended rate in bits/s or None
    while it is meant to be down). Judged: the windows backlogged at every sample, each
    within a stretch at one intended rate, and sized for that rate."""
    judged, slow = Counter(), []
    for name, samples in series.items():
        for rate, stretch in itertools.groupby(samples, key=lambda s: s[3]):
            if rate is None:
                continue
            for w in windows(list(stretch), pace_window(rate)):
                if any(s[2] == 0 for s in w):
                    continue
                judged[name] += 1
                seconds, sent = w[-1][0] - w[0][0], w[-1][1] - w[0][1]
                if sent + GSO_MAX < LINK_PACE_MIN * rate / 8 * seconds:
                    slow.append((8 * sent / seconds / rate, name))
    total = sum(judged.values())
    if not total:
        return Check("link pace", True, "no link was backlogged for a whole window")
    if not slow:
        return Check("link pace", True, f"all {total} backlogged windows at >= "
                                        f"{LINK_PACE_MIN:.0%} of the link's rate", 1.0)
    worst, where = min(slow)
    own = sum(1 for _, name in slow if name == where)
    return Check("link pace", False,
                 f"{len(slow)} of {total} backlogged windows below {LINK_PACE_MIN:.0%} "
                 f"of the link's rate (worst: {where} at {worst:.0%}, {own} of its "
                 f"{judged[where]})", worst)


def pace_window(rate: int) -> float:
    """Seconds of a link-pace window at `rate` bits/s: PACE_SAMPLES, or PACE_SEGMENTS segments."""
    return max(PACE_SAMPLES / SAMPLE_HZ, PACE_SEGMENTS * GSO_MAX * 8 / rate)


def kernel_check(kernels: Quantiles, windows: Quantiles | None = None,
                 pairs: LatenessPairs | None = None) -> Check:
    """Judged on single `kernels`; `windows` and `pairs` are kept beside it for the record
    (and --rejudge)."""
    if not kernels.count:
        return Check("kernel lateness", True, "no emulated kernel ran")
    p99 = kernels.quantile(QUANTILE)
    histograms = {"kernels": kernels.to_json()}
    if windows is not None:
        histograms["windows"] = windows.to_json()
    if pairs is not None:
        histograms["pairs"] = pairs.to_json()
    return Check("kernel lateness", p99 <= KERNEL_LATENESS_MAX,
                 f"p99 {p99:.1%} of the kernel's time, over {kernels.count:.1f} s of GPU time "
                 f"(needs <= {KERNEL_LATENESS_MAX:.0%})", p99, histograms)


def worst_agent_check(name: str, per_agent: dict[str, Quantiles], limit: float,
                      unreported: str, describe: Callable[[float, str], str]) -> Check:
    """A per-agent figure (its p99) judged against `limit`: the figure is the worst agent's,
    `describe(figure, agent)` says it, and every agent over the limit is counted."""
    measured = {agent: q.quantile(QUANTILE) for agent, q in per_agent.items() if q.count}
    if not measured:
        return Check(name, False, unreported)
    worst = max(measured, key=measured.get)
    over_limit = [a for a, figure in measured.items() if figure > limit]
    over = f"; {len(over_limit)} of {len(measured)} agents over" if over_limit else ""
    return Check(name, not over_limit, describe(measured[worst], worst) + over,
                 measured[worst], {agent: per_agent[agent].to_json() for agent in measured})


def loop_check(lags: dict[str, Quantiles], silent: list[str]) -> Check:
    """`silent`: agents that did not answer for their loop, the most overloaded ones perhaps."""
    if silent:
        return Check("event-loop lag", False,
                     f"no report from {len(silent)} agent(s): {', '.join(silent)}")
    return worst_agent_check(
        "event-loop lag", lags, LOOP_LAG_MAX, "no agent reported its event loop",
        lambda lag, agent: f"worst p99 {lag * 1e3:.1f} ms ({agent}), emulated "
                           f"(needs <= {LOOP_LAG_MAX * 1e3:.0f} ms)")


def agent_cpu_check(cpu: dict[str, Quantiles]) -> Check:
    """`cpu`: each agent's CPU share per 1 s window (agents/fidelity.py, Timeliness)."""
    return worst_agent_check(
        "agent CPU", cpu, AGENT_CPU_MAX, "no agent reported its CPU use",
        lambda share, agent: f"busiest p99 {share:.0%} of a core ({agent}) "
                             f"(needs <= {AGENT_CPU_MAX:.0%})")


class FidelityWatch:
    """Samples the host CPU and every shaped link end at SAMPLE_HZ in a thread, while a
    `with` block runs. `intended(host, nic)` is a link's rate as the testbed means it now
    (bits/s; None while it is down): the plan's unless a fault changed it."""

    def __init__(self, record: FabricRecord, intended: Callable[[str, str], int | None]):
        self.intended = intended
        self.sockets = {"": RtnlSocket()}
        self.ends: list[LinkEnd] = []
        ports = self.sockets[""].indexes()
        for host in record.hosts:
            shaped = [i for i in host.interfaces if i["rate"] is not None]
            if not shaped:
                continue
            ns = self.sockets[host.name] = RtnlSocket(f"/proc/{host.pid}/ns/net")
            ends = ns.indexes()
            for intf in shaped:
                for direction, key, index in (("tx", host.name, ends.get(intf["name"])),
                                              ("rx", "", ports.get(intf["switch_port"]))):
                    if index is not None:
                        self.ends.append(LinkEnd(host.name, intf["name"], direction, key, index))
        self.cpu: list[tuple[float, int, int, int]] = []   # (time, busy, total, steal)
        self.links: dict[str, list[tuple]] = {end.name: [] for end in self.ends}
        # The latest sample's bytes received per (host, nic), with its time, replaced whole
        # so that a reader in another thread sees one sample of every host.
        self.latest: tuple[float, dict[tuple[str, str], int]] = (time.monotonic(), {})
        self.span: list[float | None] = [None, None]    # the workload's start and end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fidelity", daemon=True)

    def __enter__(self) -> "FidelityWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets.values():
            sock.close()

    def _run(self) -> None:
        period = 1 / SAMPLE_HZ
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample(self) -> None:
        now = time.monotonic()
        self.cpu.append((now, *cpu_times()))
        try:
            qdiscs = {key: sock.root_qdiscs(ROOT) for key, sock in self.sockets.items()}
        except OSError:            # a namespace torn down under us: the run is ending
            return
        received = {}
        for end in self.ends:
            sent_queued = qdiscs[end.namespace].get(end.index)
            if sent_queued:
                self.links[end.name].append(
                    (now, *sent_queued, self.intended(end.host, end.nic)))
                if end.direction == "rx":
                    received[(end.host, end.nic)] = sent_queued[0]
        self.latest = (now, received)

    def workload_starts(self) -> None:
        self.span[0] = time.monotonic()

    def workload_ends(self) -> None:
        self.span[1] = time.monotonic()

    def _during(self, samples: list[tuple]) -> list[tuple]:
        """The samples taken while the workload ran (seeding and teardown are not judged)."""
        start, end = self.span
        return [s for s in samples if (start is None or s[0] >= start)
                and (end is None or s[0] <= end)]

    def received(self, nic: str) -> tuple[float, dict[str, int]]:
        """The latest sample's time (wall, monotonic) and the bytes each host has received on
        `nic` by then (its switch port's sent bytes: the host interface's count, without a
        netlink read of the caller's own)."""
        at, received = self.latest
        return at, {host: sent for (host, name), sent in received.items() if name == nic}

    @property
    def cpu_mean(self) -> float:
        """The mean busy share of all cores while the workload ran."""
        return self._cpu_share(1)

    @property
    def cpu_steal(self) -> float:
        """The share of all cores' time the hypervisor gave to other machines while the
        workload ran (counted busy in `cpu_mean`): a host hiccup no agent caused."""
        return self._cpu_share(3)

    def _cpu_share(self, field: int) -> float:
        """The share of all cores' time in a jiffy count of the CPU samples, while the
        workload ran."""
        cpu = self._during(self.cpu)
        if len(cpu) < 2 or cpu[-1][2] <= cpu[0][2]:
            return 0.0
        return (cpu[-1][field] - cpu[0][field]) / (cpu[-1][2] - cpu[0][2])

    def verdict(self, kernel_lateness: dict[str, Quantiles | LatenessPairs],
                loop_lags: dict[str, Quantiles], agent_cpu: dict[str, Quantiles],
                silent: list[str]) -> Verdict:
        """`kernel_lateness`: "windows", "kernels" and "pairs" (agents/fidelity.py,
        KernelLateness); `agent_cpu`: each agent's CPU share per window; `silent`: the
        agents that did not report their measures (and no fault stopped)."""
        links = {name: self._during(samples) for name, samples in self.links.items()}
        return Verdict([cpu_check(self._during(self.cpu)), link_check(links),
                        kernel_check(kernel_lateness["kernels"], kernel_lateness["windows"],
                                     kernel_lateness["pairs"]),
                        loop_check(loop_lags, silent), agent_cpu_check(agent_cpu)])
