"""The control channel: newline-delimited JSON over TCP on the management network.

Each agent answers {"op": NAME, ...} with {"ok": true, ...} or {"ok": false, "error": why}.
It never carries KV bytes; the test tools, the CLI and (later) the scheduler use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import traceback
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agents.clock import clock

CONTROL_PORT = 7000
Handler = Callable[[dict], Awaitable[dict]]
T = TypeVar("T")
log = logging.getLogger("control")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Connections that finished a call, kept for the next call to the same address, by event
# loop. A connection a call opens and closes costs both ends a TCP handshake and teardown:
# a fifth of a prefill engine's CPU on 1P2D at TDF 1 (py-spy), where each leader fetches
# every 20 ms and the scheduler pings every agent. A session answers one call at a time, so
# each call takes a connection to itself; concurrent calls to one address open more.
_idle: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, list[Streams]]]" = \
    weakref.WeakKeyDictionary()
IDLE_PER_ADDRESS = 4


async def serve_control(address: str, handlers: dict[str, Handler]) -> asyncio.base_events.Server:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                op = None
                try:
                    message = json.loads(line)
                    op = message.get("op")
                    if op not in handlers:
                        raise ValueError(f"op: got {op!r}, expected one of {sorted(handlers)}")
                    reply = {"ok": True, **await handlers[op](message)}
                except Exception as exc:   # a bad command must not end the agent
                    log.warning("control %s failed: %s", op if isinstance(op, str) else
                                line[:80], exc)
                    log.debug("%s", traceback.format_exc())
                    reply = {"ok": False, "error": error_text(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(session, address, CONTROL_PORT, limit=16 << 20,
                                      reuse_address=True)


def error_text(exc: BaseException) -> str:
    """An exception as a reason: its type and message (some, such as a timeout, have no
    message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def call(address: str, op: str, timeout: float = 3600.0, **fields) -> dict:
    """Blocking control call from outside the agents (CLI, tests), `timeout` in emulated
    seconds. Raises on failure."""
    with socket.create_connection((address, CONTROL_PORT), timeout=clock.wall(timeout)) as sock:
        sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"{address}: closed the control connection during {op}")
            data += chunk
    reply = json.loads(data)
    if not reply.pop("ok"):
        raise RuntimeError(f"{address} {op}: {reply['error']}")
    return reply


def _idle_to(address: str) -> list[Streams]:
    return _idle.setdefault(asyncio.get_running_loop(), {}).setdefault(address, [])


async def _connect(address: str, timeout: float) -> Streams:
    """An idle connection to `address` that its peer has not closed, else a new one. A peer
    that exited (a killed agent) closed its end, and the transport, which reads even while
    idle, has seen that by the time the loop comes back to a call."""
    idle = _idle_to(address)
    while idle:
        reader, writer = idle.pop()
        if not reader.at_eof() and not writer.is_closing():
            return reader, writer
        writer.close()
    return await asyncio.wait_for(
        asyncio.open_connection(address, CONTROL_PORT, limit=16 << 20),
        clock.wall(min(10.0, timeout)))


async def closing_idle(work: Awaitable[T]) -> T:
    """`work`; then this event loop's idle connections are closed, for a loop that ends."""
    try:
        return await work
    finally:
        for idle in _idle.pop(asyncio.get_running_loop(), {}).values():
            for _, writer in idle:
                writer.close()


async def acall(address: str, op: str, timeout: float = 3600.0, **fields) -> dict:
    """The same call from inside an agent, without blocking its event loop."""
    reader, writer = await _connect(address, timeout)
    line = b""
    try:
        writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), clock.wall(timeout))
    finally:
        # Only a connection whose answer was read whole is in step for the next call.
        idle = _idle_to(address)
        if line.endswith(b"\n") and len(idle) < IDLE_PER_ADDRESS:
            idle.append((reader, writer))
        else:
            writer.close()
    if not line:
        raise ConnectionError(f"{address}: closed the control connection during {op}")
    reply = json.loads(line)
    if not reply.pop("ok"):
        raise RuntimeError(f"{address} {op}: {reply['error']}")
    return reply
