"""The engine agent: one per GPU host, prefill or decode.

Prefill runs a request layer by layer: it loads layer L+1's KV from a node's DRAM while it
computes layer L (compute is time from the model profile), runs the expert-parallel
all-to-all with the other prefill GPUs (EF), then sends that layer's KV to the decode node:
hit + miss KV on the PE read path, miss-token KV only on the DE read path.

Decode waits for the complete prompt KV in its node's DRAM, copies it in one bulk H2D,
then runs decode steps (profile time plus an all-to-all with the other decode GPUs, EF),
persisting a Full Block every 64 generated tokens: D2H to the node, which writes it to
storage over its SNIC.

Oracle mode skips every KV transfer, keeping only compute and all-to-all.
"""

from __future__ import annotations

import asyncio
import time

from agents import protocol
from agents.kv import Block, Geometry, Verifier, full_block_frame, layer_frame, parse_blocks
from agents.node import NODE_PORT
from agents.protocol import Frame, MessageType, ProtocolError, kv_bytes
from agents.runtime import Agent, run

ALL_TO_ALL_PORT = 7004
PERSIST_TOKENS = 64          # decode persists a block every 64 generated tokens (paper §3.3)


class Connection:
    """A reusable connection to one peer; one exchange at a time."""

    def __init__(self, address: str, port: int, dscp: int):
        self.address, self.port, self.dscp = address, port, dscp
        self.lock = asyncio.Lock()
        self.streams = None

    async def get(self):
        if self.streams is None:
            self.streams = await protocol.open_connection(self.address, self.port, self.dscp)
        return self.streams

    def reset(self) -> None:
        if self.streams:
            self.streams[1].close()
        self.streams = None


class EngineAgent(Agent):
    name = "engine"

    async def start(self) -> None:
        self.role = self.host.role
        self.verifier = Verifier()
        self.connections: dict[tuple[str, int, str], Connection] = {}
        self.peers = [h for h in self.plan.of_kind("gpu")
                      if h.role == self.role and h.name != self.host.name]
        self.unfinished: dict[int, int] = {}      # request -> tokens
        self.counters = {"layer_bytes_received": 0, "kv_bytes_pushed": 0,
                         "prompt_bytes_fetched": 0, "persisted_bytes": 0,
                         "all_to_all_bytes_sent": 0, "all_to_all_bytes_received": 0}
        await protocol.serve(self.on_all_to_all, self.host.address("cnic"), ALL_TO_ALL_PORT,
                             protocol.DSCP_EF)

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "prefill": self.prefill, "decode": self.decode}

    async def stats(self, _message: dict) -> dict:
        return {**self.counters, **self.verifier.stats(), "role": self.role,
                "unfinished_requests": len(self.unfinished),
                "unfinished_tokens": sum(self.unfinished.values())}

    def connection(self, host: str, intf: str, port: int, dscp: int, purpose: str) -> Connection:
        key = (host, port, purpose)
        if key not in self.connections:
            self.connections[key] = Connection(self.address(host, intf), port, dscp)
        return self.connections[key]

    async def exchange(self, conn: Connection, frames: list[Frame], replies, *types) -> list[Frame]:
        async with conn.lock:
            reader, writer = await conn.get()
            try:
                for frame in frames:
                    await protocol.write_frame(writer, frame)
                return [await protocol.expect(reader, *types) for _ in range(replies)]
            except (ProtocolError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.CancelledError):
                conn.reset()   # replies may be left unread: the stream is out of step
                raise

    # -- all-to-all (model-execution traffic, EF) -------------------------------------------
    async def all_to_all(self, request: int, layer: int, total_bytes: int) -> float:
        """One layer's expert-parallel exchange: this GPU's share goes to every peer
        (dispatch) and comes back (combine), all of it EF."""
        if not self.peers or total_bytes <= 0:
            return 0.0
        started = time.monotonic()
        share = max(1, total_bytes // len(self.peers))

        async def one(peer) -> None:
            conn = self.connection(peer.name, "cnic", ALL_TO_ALL_PORT, protocol.DSCP_EF, "a2a")
            frame = Frame(MessageType.ALL_TO_ALL, request, layer, block=request,
                          payload=kv_bytes(request, layer, share))
            [back] = await self.exchange(conn, [frame], 1, MessageType.ALL_TO_ALL)
            if back.payload != frame.payload:
                raise ProtocolError(f"all-to-all combine from {peer.name} does not verify")
            self.counters["all_to_all_bytes_sent"] += share
            self.counters["all_to_all_bytes_received"] += len(back.payload)

        await asyncio.gather(*(one(p) for p in self.peers))
        return time.monotonic() - started

    async def on_all_to_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                if frame.type != MessageType.ALL_TO_ALL or \
                        frame.payload != kv_bytes(frame.block, frame.layer, len(frame.payload)):
                    raise ProtocolError(f"bad all-to-all frame {frame.type.name}")
                self.counters["all_to_all_bytes_received"] += len(frame.payload)
                await protocol.write_frame(writer, frame)   # the combine: same bytes back
        except (ProtocolError, ConnectionError) as exc:
            self.log.warning("closing all-to-all connection from %s: %s", peer, exc)
        finally:
            writer.close()

    # -- prefill ----------------------------------------------------------------------------
    async def prefill(self, m: dict) -> dict:
        """m: request, geometry, hit, miss (blocks), path ('pe'|'de'), read_node,
        decode_node, layer_seconds, all_to_all_bytes (per layer, emulated), oracle."""
        request, geometry = int(m["request"]), Geometry.from_json(m["geometry"])
        hit, miss = parse_blocks(m["hit"]), parse_blocks(m["miss"])
        oracle, path = bool(m.get("oracle")), m["path"]
        if path not in ("pe", "de"):
            raise ValueError(f"path: got {path!r}, expected 'pe' or 'de'")
        read_node = self.connection(m["read_node"], "pcie", NODE_PORT, protocol.DSCP_CS1, "read")
        # A push is one stream of frames per request: it gets a connection of its own.
        push_node = Connection(self.address(m["decode_node"], "pcie"), NODE_PORT, protocol.DSCP_CS1)
        self.unfinished[request] = sum(t for _, t in hit + miss)
        timings = {"load": 0.0, "layer_wait": 0.0, "compute": 0.0, "all_to_all": 0.0, "push": 0.0}
        moved = {"layer_bytes": 0, "pushed_bytes": 0, "load_window": None}  # this request's KV
        started = time.monotonic()
        loading = pushing = None
        try:
            if not oracle and hit:
                t, wall = time.monotonic(), time.time()
                await self.exchange(read_node, [protocol.control(MessageType.LOAD, {
                    "geometry": geometry.to_json(), "blocks": hit}, request)], 1, MessageType.ACK)
                timings["load"] = time.monotonic() - t
                moved["load_window"] = [wall, time.time()]   # wall clock: comparable across hosts

            async def load_layer(layer: int) -> None:
                if oracle or not hit:
                    return
                frame = protocol.control(MessageType.LAYER_READ, {
                    "release": path == "pe" and layer == geometry.layers - 1}, request)
                frame.layer = layer
                [data] = await self.exchange(read_node, [frame], 1, MessageType.LAYER_DATA)
                self.verifier.layer(geometry, hit, layer, data.payload)
                self.counters["layer_bytes_received"] += len(data.payload)
                moved["layer_bytes"] += len(data.payload)
                received[layer] = data.payload

            received: dict[int, bytes] = {}   # hit KV per layer, as it arrived in "HBM"
            sent = hit + miss if path == "pe" else miss
            push_started = None
            if not oracle and sent:
                push_started = protocol.control(MessageType.KV_PUSH, {
                    "geometry": geometry.to_json(), "blocks": sent, "prompt": hit + miss,
                    "persist": miss}, request)

            async def push_layer(layer: int, first: bool) -> None:
                if push_started is None:
                    return
                t = time.monotonic()
                # The layer's KV leaves "HBM": on the PE path the hit KV it received, then
                # the miss KV it computed; on the DE path the miss KV only.
                data = layer_frame(geometry, miss, layer, request)
                if path == "pe" and hit:
                    data.payload = received.pop(layer, b"") + data.payload
                    data.block, data.count = sent[0][0], len(sent)
                frames = ([push_started] if first else []) + [data]
                await self.exchange(push_node, frames, 1, MessageType.ACK)
                self.counters["kv_bytes_pushed"] += len(frames[-1].payload)
                moved["pushed_bytes"] += len(frames[-1].payload)
                timings["push"] += time.monotonic() - t

            loading = asyncio.create_task(load_layer(0))
            pushing = None
            for layer in range(geometry.layers):
                t = time.monotonic()
                await loading
                timings["layer_wait"] += time.monotonic() - t
                if layer + 1 < geometry.layers:
                    loading = asyncio.create_task(load_layer(layer + 1))
                t = time.monotonic()
                await asyncio.sleep(float(m["layer_seconds"]))
                timings["compute"] += time.monotonic() - t
                timings["all_to_all"] += await self.all_to_all(request, layer,
                                                               int(m["all_to_all_bytes"]))
                if pushing:
                    await pushing
                pushing = asyncio.create_task(push_layer(layer, layer == 0))
            if pushing:
                await pushing
        finally:
            for task in (loading, pushing):
                if task is not None and not task.done():
                    task.cancel()
            self.unfinished.pop(request, None)
            push_node.reset()
        return {"seconds": time.monotonic() - started, "timings": timings, **moved,
                "verifier": self.verifier.stats()}

    # -- decode -----------------------------------------------------------------------------
    async def decode(self, m: dict) -> dict:
        """m: request, geometry, prompt (blocks), generate (tokens), step_seconds,
        all_to_all_bytes (per step, emulated), generated_block_base (first block id), oracle."""
        request, geometry = int(m["request"]), Geometry.from_json(m["geometry"])
        prompt, generate = parse_blocks(m["prompt"]), int(m["generate"])
        oracle = bool(m.get("oracle"))
        node = self.connection(self.host.node, "pcie", NODE_PORT, protocol.DSCP_CS1, "decode")
        self.unfinished[request] = sum(t for _, t in prompt) + generate
        started, started_wall = time.monotonic(), time.time()
        fetched = 0
        try:
            verify_seconds = 0.0
            if not oracle:
                frames = await self.exchange(node, [protocol.control(MessageType.FETCH, {
                    "geometry": geometry.to_json()}, request)],
                    len(prompt) + 1, MessageType.FULL_BLOCK, MessageType.ACK)
                arrived = time.monotonic()
                if frames[-1].type != MessageType.ACK:
                    raise ProtocolError(f"request {request}: prompt fetch ended early")
                for block, frame in zip(prompt, frames):
                    self.verifier.full_block(geometry, block, frame.payload)
                    fetched += len(frame.payload)
                verify_seconds = time.monotonic() - arrived
                self.counters["prompt_bytes_fetched"] += fetched
            # The H2D is the copy; checking every byte is the testbed's, not the GPU's, work.
            h2d = time.monotonic() - started - verify_seconds
            h2d_window = [started_wall, started_wall + h2d]
            first_token = time.monotonic()
            steps, persisted = [], []
            base = int(m["generated_block_base"])
            for token in range(1, generate + 1):
                t = time.monotonic()
                await asyncio.sleep(float(m["step_seconds"]))
                await self.all_to_all(request, token % 0xFFFF, int(m["all_to_all_bytes"]))
                steps.append(time.monotonic() - t)
                if not oracle and token % PERSIST_TOKENS == 0:
                    block = (base + len(persisted), PERSIST_TOKENS)
                    frame = full_block_frame(geometry, block, request)
                    await self.exchange(node, [protocol.control(MessageType.PERSIST, {
                        "geometry": geometry.to_json(), "blocks": [block]}, request), frame],
                        1, MessageType.ACK)
                    self.counters["persisted_bytes"] += len(frame.payload)
                    persisted.append(block)
        finally:
            self.unfinished.pop(request, None)
        return {"seconds": time.monotonic() - started, "h2d_seconds": h2d, "h2d_window": h2d_window,
                "verify_seconds": verify_seconds,
                "prompt_bytes": fetched, "steps": len(steps),
                "tpot": sum(steps) / len(steps) if steps else 0.0,
                "decode_seconds": time.monotonic() - first_token,
                "persisted": persisted, "verifier": self.verifier.stats()}


if __name__ == "__main__":
    run(EngineAgent)
