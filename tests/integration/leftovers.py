"""What a run may leave behind, looked up independently of testbed.cleanup."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agents.storage import DATA_ROOT
from testbed.hosts import HOST_MARKER
from testbed.state import STATE_DIR, STATE_FILE


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
    for kind, marker in (("processes", HOST_MARKER),
                         ("prometheus servers", "DUALPATH_TESTBED_SERVER")):
        marked = subprocess.run(["grep", "-l", "-s", "-a", f"{marker}=",
                                 *[f"/proc/{p}/environ" for p in _pids()]],
                                capture_output=True, text=True).stdout.split()
        if marked:
            found[kind] = marked
    if unreaped := unreaped_children():
        found["unreaped children"] = unreaped
    if DATA_ROOT.exists():
        found["storage files"] = [str(DATA_ROOT)]
    for name, path in (("state file", STATE_FILE), ("fault socket", STATE_DIR / "faults.sock"),
                       ("scrape targets", STATE_DIR / "prometheus" / "targets.json")):
        if path.exists():
            found[name] = [str(path)]
    return found


def unreaped_children() -> list[str]:
    """This process's children that exited and were never waited for (zombies): a marked
    process killed unreaped loses its marker with its environment, so it is looked up here."""
    found = []
    for pid in _pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:                  # gone meanwhile
            continue
        named, rest = stat.rsplit(")", 1)         # "pid (comm" and " state ppid ..."
        state, ppid = rest.split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            found.append(f"{pid} {named.split('(', 1)[1]}")
    return found


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
