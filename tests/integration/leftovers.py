"""What a run may leave behind, looked up independently of testbed.cleanup."""

from __future__ import annotations

import subprocess

from agents.storage import DATA_ROOT
from testbed.hosts import HOST_MARKER
from testbed.state import STATE_FILE


def find_leftovers() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    ours = [line.split(": ")[1].split("@")[0] for line in links.splitlines()
            if line.split(": ")[1].startswith(("dpcomp", "dpstor", "dpmgmt"))]
    if ours:
        found["links"] = ours
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=dualpath.testbed"],
        capture_output=True, text=True).stdout.split()
    if containers:
        found["containers"] = containers
    marked = subprocess.run(["grep", "-l", "-s", "-a", f"{HOST_MARKER}=",
                             *[f"/proc/{p}/environ" for p in _pids()]],
                            capture_output=True, text=True).stdout.split()
    if marked:
        found["processes"] = marked
    if DATA_ROOT.exists():
        found["storage files"] = [str(DATA_ROOT)]
    if STATE_FILE.exists():
        found["state file"] = [str(STATE_FILE)]
    return found


def _pids() -> list[str]:
    import os
    return [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
