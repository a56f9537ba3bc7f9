"""The scenario report's figures, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def write_plots(out: Path, results: list[dict]) -> list[Path]:
    """jct.png (JCT per policy), snic.png (SNIC read utilization over time, per node and
    policy) and ttft_cdf.png (TTFT distribution per policy)."""
    written = []

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 3.5))
    ax.bar([_label(r, results) for r in results], [r["jct"] for r in results], color="#4878a8")
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


def _label(result: dict, results: list[dict]) -> str:
    """The policy, and the topology when the scenario has more than one."""
    if len({r["topology"] for r in results}) > 1:
        return f"{result['topology']}\n{result['policy']}"
    return result["policy"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
