"""The record of the running fabric, so that any shell can inspect, enter or stop it.

One fabric runs per machine. Its owner (the `testbed fabric up` process) writes the record
once the fabric is up and removes it after teardown; a record whose owner is dead is stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_DIR = Path(os.environ.get("DUALPATH_STATE_DIR", "/run/dualpath-testbed"))
STATE_FILE = STATE_DIR / "fabric.json"
LOG_FILE = STATE_DIR / "fabric.log"
LOCK_FILE = STATE_DIR / "fabric.lock"


class FabricLock:
    """Held by the fabric's owner for its lifetime: one fabric per machine, without races.
    The kernel drops it when the owner dies, however it dies."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def acquire(self) -> bool:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)   # close-on-exec by default
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def fabric_running() -> bool:
    lock = FabricLock()
    if lock.acquire():
        lock.release()
        return False
    return True


@dataclass
class HostRecord:
    name: str
    kind: str
    role: str
    pid: int                       # a process inside the host's network namespace
    container: str | None
    interfaces: list[dict] = field(default_factory=list)


@dataclass
class FabricRecord:
    topology: str
    name: str
    backend: str
    owner_pid: int
    status: str                    # "starting", "up" (network), "ready" (agents answer too)
    topology_json: str = ""        # the validated topology, overrides applied
    started_at: float = field(default_factory=time.time)
    up_seconds: float | None = None
    hosts: list[HostRecord] = field(default_factory=list)

    def host(self, name: str) -> HostRecord | None:
        return next((h for h in self.hosts if h.name == name), None)

    def write(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = STATE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(STATE_FILE)     # readers never see half a file

    @classmethod
    def read(cls) -> FabricRecord | None:
        try:
            data = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return None
        data["hosts"] = [HostRecord(**h) for h in data.get("hosts", [])]
        return cls(**data)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent has not collected it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def remove_record() -> None:
    STATE_FILE.unlink(missing_ok=True)
