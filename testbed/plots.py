"""The scenario report's figures, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def write_plots(out: Path, results: list[dict], summaries: list[dict],
                slo_ttft: float) -> list[Path]:
    """jct.png (JCT per policy) offline, or capacity.png (mean TTFT against the arrival rate,
    with the SLO) online; snic.png (SNIC read utilization over time, per node and run) and
    ttft_cdf.png (TTFT distribution per run)."""
    written = []

    online = [s for s in summaries if s["aps"] is not None]
    if online:
        written.append(_capacity(out, online, slo_ttft))
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 3.5))
        ax.bar([_label(r, results) for r in results], [r["jct"] for r in results],
               color="#4878a8")
        ax.set_ylabel("JCT (s, real-cluster time)")
        ax.set_title("Job completion time per policy")
        written.append(_save(fig, out / "jct.png"))

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 2.6 * len(results)), sharex=True,
                             squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        for node, series in sorted(result["snic_timeline"].items()):
            ax.plot([t for t, _ in series], [u for _, u in series], label=node)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("SNIC read")
        ax.set_title(_label(result, results).replace("\n", " / "))
        ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("time (s)")
    written.append(_save(fig, out / "snic.png"))

    if any(result.get("links") for result in results):
        written.append(_links(out, results))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for result in results:
        ttft = sorted(r["ttft"] for r in result["records"])
        ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post",
                label=_label(result, results).replace("\n", " / "))
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("share of turns")
    ax.legend()
    ax.set_title("TTFT CDF")
    written.append(_save(fig, out / "ttft_cdf.png"))
    return written


def _links(out: Path, results: list[dict]) -> Path:
    """links.png: per run, SNIC read and CNIC receive utilization over time per host, as
    Prometheus scraped them from the link exporter."""
    kinds = list(results[0]["links"])
    fig, axes = plt.subplots(len(results), len(kinds), figsize=(5 * len(kinds), 2.6 * len(results)),
                             sharex="row", squeeze=False)
    for row, result in zip(axes, results):
        for ax, kind in zip(row, kinds):
            for host, series in sorted(result["links"][kind].items()):
                ax.plot([t for t, _ in series], [u for _, u in series], label=host)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(f"{kind} utilization")
            ax.set_title(f"{_label(result, results).replace(chr(10), ' / ')}: {kind}")
            if ax.lines:
                ax.legend(loc="upper right", fontsize="x-small", ncol=2)
            else:   # a run shorter than the rate window (5 s of wall time) has no samples yet
                ax.text(0.5, 0.5,
                        "no samples: the run was shorter than the rate window (5 s of wall time)",
                        ha="center", va="center", transform=ax.transAxes, fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    return _save(fig, out / "links.png")


def _capacity(out: Path, online: list[dict], slo_ttft: float) -> Path:
    """Mean TTFT (as the SLO judges it) against the arrival rate, per topology and policy."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in dict.fromkeys((s["topology"], s["policy"]) for s in online):
        runs = [s for s in online if (s["topology"], s["policy"]) == key]
        ax.plot([s["aps"] for s in runs], [s["ttft"] for s in runs], marker="o",
                label=" / ".join(key))
    ax.axhline(slo_ttft, color="grey", linestyle="--", label="SLO")
    ax.set_xlabel("agents arriving per second (APS)")
    ax.set_ylabel("mean TTFT (s)")
    ax.set_title("Online latency against load")
    ax.legend(fontsize="small")
    return _save(fig, out / "capacity.png")


def _label(result: dict, results: list[dict]) -> str:
    """The policy, with the topology and the arrival rate when the scenario has several."""
    label = result["policy"]
    if len({r["topology"] for r in results}) > 1:
        label = f"{result['topology']}\n{label}"
    if len({r["aps"] for r in results}) > 1:
        label += f"\n{result['aps']:g} APS"
    return label


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
