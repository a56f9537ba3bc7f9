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
from collections.abc import Awaitable, Callable

from agents.clock import clock

CONTROL_PORT = 7000
Handler = Callable[[dict], Awaitable[dict]]
log = logging.getLogger("control")


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


async def acall(address: str, op: str, timeout: float = 3600.0, **fields) -> dict:
    """The same call from inside an agent, without blocking its event loop."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address, CONTROL_PORT, limit=16 << 20),
        clock.wall(min(10.0, timeout)))
    try:
        writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), clock.wall(timeout))
    finally:
        writer.close()
    if not line:
        raise ConnectionError(f"{address}: closed the control connection during {op}")
    reply = json.loads(line)
    if not reply.pop("ok"):
        raise RuntimeError(f"{address} {op}: {reply['error']}")
    return reply
