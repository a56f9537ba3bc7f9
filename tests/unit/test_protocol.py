"""Frames on a real TCP connection, in a network namespace of the test's own (as root): there
the kernel's segment counters see only the test's traffic."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from agents.protocol import HEADER_SIZE

REPO = Path(__file__).resolve().parents[2]

# Sends frames between two sockets on the namespace's loopback, and prints what the reader got
# and how many TCP segments the namespace sent meanwhile (data and the ACKs for it).
EXCHANGE = textwrap.dedent("""
    import asyncio, json, subprocess, sys
    from agents.protocol import Frame, MessageType, read_frame, write_frame, write_frames

    def out_segments():
        lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
        return int(lines[1][lines[0].index("OutSegs")])

    async def main(together):
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        got = asyncio.Queue()

        async def serve(reader, writer):
            while (frame := await read_frame(reader)) is not None:
                await got.put(frame)

        server = await asyncio.start_server(serve, "127.0.0.1", 7999)
        reader, writer = await asyncio.open_connection("127.0.0.1", 7999)
        await asyncio.sleep(0.2)          # the handshake's segments are all out
        frames = [Frame(MessageType.LAYER_READ, request=7, layer=i, payload=b"x" * (100 + i))
                  for i in range(3)]
        before = out_segments()
        if together:
            sent = await write_frames(writer, frames)
        else:
            sent = sum([await write_frame(writer, f) for f in frames])
        received = [await got.get() for _ in frames]
        await asyncio.sleep(0.2)          # and the receiver's ACKs
        segments = out_segments() - before
        writer.close()
        server.close()
        print(json.dumps({"segments": segments, "sent": sent,
                          "received": [[f.layer, len(f.payload)] for f in received]}))

    asyncio.run(main(sys.argv[1] == "together"))
""")


def exchange(how: str) -> dict:
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", EXCHANGE, how],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_frames_written_together_arrive_whole_and_in_order():
    result = exchange("together")
    assert result["received"] == [[0, 100], [1, 101], [2, 102]]
    assert result["sent"] == 3 * HEADER_SIZE + 303


def test_frames_written_together_leave_in_one_segment_where_one_at_a_time_take_one_each():
    """Every send costs the emulated fabric's whole path, so a batch's frames to one peer go
    out in one: its data segment and at most the ACK for it, against a segment per frame."""
    together, apart = exchange("together"), exchange("apart")
    assert together["segments"] <= 2, together
    assert apart["segments"] >= 3, apart
