"""Control calls reuse their connections: one TCP connection serves call after call, a
peer that went away costs no failed call, and an answer not read whole never reaches the
next call. A real server on loopback, counted from the kernel's own table of sockets."""

from __future__ import annotations

import asyncio

import pytest

from agents.control import CONTROL_PORT, acall, closing_idle, serve_control

ADDRESS = "127.0.0.1"


def established_to_control_port() -> int:
    """Connections to the control port that the server end holds open (/proc/net/tcp)."""
    port = f"{CONTROL_PORT:04X}"
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if row[1].endswith(f":{port}") and row[3] == "01")


async def echo(message: dict) -> dict:
    await asyncio.sleep(message.get("sleep", 0))
    return {"n": message["n"]}


async def server():
    return await serve_control(ADDRESS, {"echo": echo})


async def settle() -> None:
    await asyncio.sleep(0.05)     # the kernel and both loops see a close


def test_calls_one_after_another_share_one_connection():
    async def main():
        srv = await server()
        try:
            for n in range(5):
                assert (await acall(ADDRESS, "echo", n=n))["n"] == n
            assert established_to_control_port() == 1
            await asyncio.gather(*(acall(ADDRESS, "echo", n=n, sleep=0.05) for n in range(3)))
            assert established_to_control_port() == 3     # each concurrent call its own
        finally:
            srv.close()
    asyncio.run(closing_idle(main()))


def test_a_peer_that_went_away_and_came_back_costs_no_call():
    async def main():
        srv = await server()
        assert (await acall(ADDRESS, "echo", n=1))["n"] == 1
        srv.close()
        await srv.wait_closed()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()          # its session ends, as when its process is killed
        await settle()
        srv = await server()       # restarted
        try:
            assert (await acall(ADDRESS, "echo", n=2))["n"] == 2
        finally:
            srv.close()
    asyncio.run(closing_idle(main()))


def test_an_answer_not_waited_for_does_not_reach_the_next_call():
    async def main():
        srv = await server()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await acall(ADDRESS, "echo", n=1, sleep=0.3, timeout=0.1)
            assert (await acall(ADDRESS, "echo", n=2))["n"] == 2
            await asyncio.sleep(0.3)        # the late answer to n=1 has arrived somewhere
            assert (await acall(ADDRESS, "echo", n=3))["n"] == 3
        finally:
            srv.close()
    asyncio.run(closing_idle(main()))


def test_closing_idle_closes_the_kept_connections():
    async def main():
        srv = await server()
        try:
            await closing_idle(acall(ADDRESS, "echo", n=1))
            await settle()
            assert established_to_control_port() == 0
        finally:
            srv.close()
    asyncio.run(main())
