"""Ctrl-C stops a bench or scenario process, on a real process and a real signal."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs like a bench: asyncio.run of a run that, cancelled, still ends normally (as a run
# gathering its agents' results does), which absorbs the cancellation asyncio.run makes of a
# Ctrl-C left to Python's default; then "the next run".
BENCH = textwrap.dedent("""
    import asyncio, sys
    from testbed.interrupts import run_interruptible

    async def one_run():
        print("running", flush=True)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass

    def main():
        for _ in range(2):
            asyncio.run(one_run())
        print("finished", flush=True)

    raise SystemExit(run_interruptible("bench", main))
""")


def test_ctrl_c_stops_a_bench_whose_run_absorbs_cancellation():
    proc = subprocess.Popen([sys.executable, "-c", BENCH], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "running\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "bench interrupted" in err
    assert "running" not in out and "finished" not in out    # no next run began
