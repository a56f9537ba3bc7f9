"""Benchmarks: they print their figures and keep them under results/bench-<name>/."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def save(name: str, started: str, figures: dict) -> Path:
    """Write results/bench-<name>/<started>.json with the machine that measured them."""
    out = REPO / "results" / f"bench-{name}" / f"{started}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = dict(node=platform.node(), kernel=platform.release(), cpus=os.cpu_count())
    out.write_text(json.dumps(dict(machine=machine, **figures), indent=1))
    print(f"\nwritten {out.relative_to(REPO)}")
    return out
