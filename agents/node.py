"""The node agent: the node's DRAM buffer and traffic manager.

- LOAD: reads Full Blocks from storage over the node's `snic` into a bounded DRAM buffer,
  keeping a read queue whose length (tokens) it reports.
- LAYER_READ: serves one layer of a request's blocks over `pcie` to any GPU: its own (PE
  read path, a loopback H2D through the GPU's CNIC) or a remote prefill GPU (DE read path).
- KV_PUSH: takes layer KV from prefill GPUs and assembles the prompt KV.
- FETCH: hands the complete prompt KV to its decode GPU (one bulk H2D), then frees it.
- PERSIST: writes decode-generated Full Blocks back to storage over the `snic`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily

from agents.clock import clock
from agents import protocol
from agents.control import error_text
from agents.links import link_up
from agents.metrics import counter, gauge, labelled, verifier_metrics
from agents.kv import Block, Geometry, Verifier, full_block_frame, layer_frame, parse_blocks, placement
from agents.protocol import Frame, MessageType, PeerError, ProtocolError
from agents.runtime import Agent, run
from agents.storage import STORAGE_PORT

NODE_PORT = 7002
DRAM_BYTES = 80e9          # real-cluster DRAM buffer per node (paper: 80 GB for DS models)
# The share of a decode node's DRAM in which prompts whose prefill has been placed may wait
# for their engine's HBM (paper §3.3: a DE allocates HBM only once the prompt is in its
# buffer). The rest is left to the loads of the DE read path.
DE_BUFFER_SHARE = 0.5
PROMPT_TIMEOUT = 600.0
RESERVE_TIMEOUT = 600.0
# A storage host that did not answer is passed over for this long: reads go to its replicas
# at once, instead of each waiting for a connection to time out.
UNREACHABLE_SECONDS = 5.0
# Hinted handoff: a block a replica missed while it was unreachable is kept (up to this many
# emulated bytes) and written to it once it answers again, so that its copies come back.
HANDOFF_BYTES = 256 << 20
HANDOFF_SECONDS = 1.0
# Requests whose blocks are read from storage at once. A request's blocks are spread over
# the storage hosts, and each host's link serves its reads in order; with every queued read
# in flight, one host's queue ran ahead of another's, so the SNIC carried parts of later
# requests while earlier ones waited for their last part, and by how far hung on timing.
# Two keep the SNIC busy across the round trip between two requests.
READS_IN_FLIGHT = 2


class Buffer:
    """The node's DRAM for KV, in emulated bytes: a reservation waits while it is full."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Condition()

    async def reserve(self, size: int, timeout: float = RESERVE_TIMEOUT) -> None:
        if size > self.capacity:
            raise PeerError(f"{size} bytes exceed the DRAM buffer of {self.capacity}")
        async with self._freed:
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.used + size <= self.capacity),
                    clock.wall(timeout))
            except asyncio.TimeoutError:
                raise PeerError(f"no room for {size} bytes in DRAM after {timeout:.0f} s "
                                f"({self.used} of {self.capacity} in use)") from None
            self.used += size

    async def free(self, size: int) -> None:
        async with self._freed:
            self.used = max(0, self.used - size)
            self._freed.notify_all()


@dataclass
class Prompt:
    """One request's KV in this node's DRAM."""
    fulls: dict[int, bytes] = field(default_factory=dict)          # block id -> Full Block
    layers: dict[int, dict[int, bytes]] = field(default_factory=dict)  # pushed: id -> layer -> bytes
    loaded: list[Block] = field(default_factory=list)              # LOADed, in order
    geometry: Geometry | None = None
    expected: list[Block] = field(default_factory=list)
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    size: int = 0
    dropped: bool = False      # the request failed elsewhere: a waiting FETCH must give up
    persisting: asyncio.Task | None = None   # the appended tokens' KV, on its way to storage

    def expect(self, blocks: list[Block]) -> None:
        if blocks:
            self.expected = blocks
        self.check()

    def check(self) -> None:
        """Complete once every expected block is in DRAM, whether loaded or pushed."""
        if self.expected and all(b in self.fulls for b, _ in self.expected):
            self.complete.set()


class Reachability:
    """Which storage hosts did not answer lately: they are passed over for
    UNREACHABLE_SECONDS, so that reads go to their replicas at once instead of each waiting
    for a connection to time out."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.until: dict[str, tuple[float, str]] = {}    # host -> (until, why)

    def failed(self, host: str, why: str) -> None:
        self.log.warning("storage host %s unreachable: %s", host, why)
        self.until[host] = (clock.now() + UNREACHABLE_SECONDS, why)

    def why_not(self, host: str) -> str | None:
        """Why `host` is passed over, or None if it is not."""
        until, why = self.until.get(host, (0.0, ""))
        return why if until > clock.now() else None

    def best_first(self, hosts: list[str]) -> list[str]:
        return sorted(hosts, key=lambda h: self.why_not(h) is not None)


class StorageLink:
    """One connection to one storage host over the SNIC; one exchange at a time. A host that
    does not answer (refused, silent, broken mid-reply) is marked in `reachability`, and
    every exchange waiting behind the failed one gives up at once with the reason."""

    def __init__(self, host: str, address: str, reachability: Reachability):
        self.host, self.address, self.reachability = host, address, reachability
        self.lock = asyncio.Lock()
        self.streams = None

    async def exchange(self, send: list[Frame], on_reply, replies: int) -> None:
        async with self.lock:
            if (why := self.reachability.why_not(self.host)) is not None:
                raise PeerError(f"storage host {self.host} unreachable: {why}")
            # A connection kept from earlier may have been closed by a storage agent that
            # restarted since: one that breaks before any reply is tried once more, afresh
            # (READ and WRITE may be sent twice).
            for fresh in (self.streams is None, True):
                answered = 0
                try:
                    if self.streams is None:
                        self.streams = await protocol.open_connection(
                            self.address, STORAGE_PORT, protocol.DSCP_CS1)
                    reader, writer = self.streams
                    for frame in send:
                        await protocol.write_frame(writer, frame)
                    for _ in range(replies):
                        reply = await protocol.expect(reader, MessageType.FULL_BLOCK,
                                                      MessageType.ACK)
                        answered += 1
                        on_reply(reply)
                    return
                except PeerError:
                    # The storage agent stops answering a READ at its first ERROR: the
                    # connection is in a known state.
                    raise
                except BaseException as exc:
                    # Replies may be left unread (cancelled, broken, malformed): start afresh.
                    if self.streams:
                        self.streams[1].close()
                    self.streams = None
                    if not isinstance(exc, (OSError, asyncio.IncompleteReadError,
                                            asyncio.TimeoutError, ProtocolError)):
                        raise
                    if not fresh and not answered:
                        continue
                    self.reachability.failed(self.host, error_text(exc))
                    raise PeerError(f"storage host {self.host} unreachable: "
                                    f"{error_text(exc)}") from None


class NodeAgent(Agent):
    name = "node"

    async def start(self) -> None:
        topology = self.plan.topology
        self.buffer = Buffer(int(self.args.dram_bytes / topology.scale))
        self.storage_hosts = [h.name for h in self.plan.of_kind("storage")]
        self.replicas = topology.storage.replicas
        self.reachability = Reachability(self.log)
        self.links = {h: StorageLink(h, self.address(h, "stor"), self.reachability)
                      for h in self.storage_hosts}
        # Writes have links of their own: the SNIC is full duplex, and a write (a decode's
        # FETCH waits for it) must not queue behind the reads of the same host.
        self.write_links = {h: StorageLink(h, self.address(h, "stor"), self.reachability)
                            for h in self.storage_hosts}
        self.prompts: dict[int, Prompt] = {}
        self.dropped: set[int] = set()         # requests that failed: never wait for them
        self.read_queue_tokens = 0
        self.reading = asyncio.Semaphore(READS_IN_FLIGHT)
        self.verifier = Verifier()
        self.counters = {"storage_read_bytes": 0, "storage_write_bytes": 0,
                         "layer_bytes_local": 0, "layer_bytes_remote": 0,
                         "pushed_bytes": 0, "fetched_bytes": 0, "persisted_blocks": 0,
                         "errors": 0, "handed_off_blocks": 0}
        self.local_gpus = {g.address("cnic") for g in self.plan.of_kind("gpu")
                           if g.node == self.host.name}
        self.handoff: dict[str, dict[int, Frame]] = {}   # host -> block id -> its WRITE
        self.handoff_bytes = 0
        self.replaying = asyncio.create_task(self.replay_handoffs())
        await protocol.serve(self.session, self.host.address("pcie"), NODE_PORT,
                             protocol.DSCP_CS1)

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "drop": self.drop_requests, "reset": self.reset}

    async def drop_requests(self, message: dict) -> dict:
        """The scheduler gave these requests up: free their DRAM, fail a FETCH waiting."""
        for request in message["requests"]:
            await self.drop(int(request), failed=True)
        return {"dropped": len(message["requests"])}

    async def reset(self, _message: dict) -> dict:
        """A new scheduler abandons everything its predecessor placed: forget every prompt."""
        requests = list(self.prompts)
        for request in requests:
            await self.drop(request, failed=True)
        return {"dropped": len(requests)}

    async def stats(self, _message: dict) -> dict:
        return {**self.counters, **self.verifier.stats(), "read_queue_tokens": self.read_queue_tokens,
                "buffer_used": self.buffer.used, "buffer_capacity": self.buffer.capacity,
                "requests_in_dram": len(self.prompts),
                "handoff_pending": sum(map(len, self.handoff.values()))}

    def metrics(self):
        scale, c = self.plan.topology.scale, self.counters
        yield gauge("dualpath_node_read_queue_tokens",
                    "Hit tokens this node is reading from storage", self.read_queue_tokens)
        yield gauge("dualpath_node_dram_used_bytes", "DRAM buffer in use (real-cluster bytes)",
                    self.buffer.used * scale)
        yield gauge("dualpath_node_dram_capacity_bytes", "DRAM buffer (real-cluster bytes)",
                    self.buffer.capacity * scale)
        yield labelled(CounterMetricFamily, "dualpath_node_layer_bytes",
                       "Layer Blocks served to prefill GPUs (real-cluster bytes): path pe to "
                       "the node's own GPUs, de to remote ones", "path",
                       {"pe": c["layer_bytes_local"] * scale, "de": c["layer_bytes_remote"] * scale})
        yield counter("dualpath_node_storage_read_bytes", "Bytes read from storage (real-cluster)",
                      c["storage_read_bytes"] * scale)
        yield counter("dualpath_node_storage_write_bytes",
                      "Bytes written to storage (real-cluster)", c["storage_write_bytes"] * scale)
        yield counter("dualpath_node_pushed_bytes",
                      "Prompt KV pushed in by prefill GPUs (real-cluster bytes)",
                      c["pushed_bytes"] * scale)
        yield from verifier_metrics(self.verifier, scale)

    def prompt(self, request: int) -> Prompt:
        if request in self.dropped:
            raise PeerError(f"request {request} was given up")
        return self.prompts.setdefault(request, Prompt())

    async def hold(self, request: int, size: int) -> Prompt:
        """Room in DRAM for `size` bytes of the request's KV, charged to its prompt (which
        a drop while this waited has taken away: then the room goes back)."""
        await self.buffer.reserve(size)
        try:
            prompt = self.prompt(request)
        except PeerError:
            await self.buffer.free(size)
            raise
        prompt.size += size
        return prompt

    async def drop(self, request: int, failed: bool = False) -> None:
        prompt = self.prompts.pop(request, None)
        if failed:
            self.dropped.add(request)
        if prompt:
            prompt.dropped = failed
            prompt.complete.set()      # wakes a FETCH waiting for it
            if failed and prompt.persisting and not prompt.persisting.done():
                prompt.persisting.cancel()
            await self.buffer.free(prompt.size)

    # -- storage ----------------------------------------------------------------------------
    async def read_blocks(self, request: int, geometry: Geometry, blocks: list[Block]) -> dict[int, bytes]:
        """Full Blocks from storage, each from the first replica that has it whole; a replica
        on a host that did not answer lately is tried last."""
        if not link_up("snic"):
            raise PeerError(f"{self.host.name}'s SNIC is down: cannot read from storage")
        tokens = sum(t for _, t in blocks)
        self.read_queue_tokens += tokens
        try:
            await self.hold(request, geometry.blocks_bytes(blocks))
            async with self.reading:
                return await self._read_replicas(request, geometry, blocks)
        finally:
            self.read_queue_tokens -= tokens

    async def _read_replicas(self, request: int, geometry: Geometry,
                             blocks: list[Block]) -> dict[int, bytes]:
        """Each block from the first replica that has it whole."""
        got: dict[int, bytes] = {}
        pending = list(blocks)
        tried: dict[int, set[str]] = {}
        reasons: list[str] = []
        for attempt in range(self.replicas):
            by_host: dict[str, list[Block]] = {}
            for block in pending:
                hosts = self.reachability.best_first(placement(
                    block[0], self.storage_hosts, self.replicas))
                host = next((h for h in hosts if h not in tried.setdefault(block[0], set())),
                            None)
                if host:
                    tried[block[0]].add(host)
                    by_host.setdefault(host, []).append(block)
            results = await asyncio.gather(
                *(self._read_from(h, request, geometry, bs, got) for h, bs in by_host.items()),
                return_exceptions=True)
            reasons += [str(r) for r in results if isinstance(r, Exception)]
            pending = [b for b in pending if b[0] not in got]
            if not pending:
                return got
            if attempt == self.replicas - 1:
                raise PeerError("; ".join(dict.fromkeys(reasons)) or "blocks missing")
        return got

    async def _read_from(self, host: str, request: int, geometry: Geometry, blocks: list[Block],
                         got: dict[int, bytes]) -> None:
        tokens = dict(blocks)
        order = iter(blocks)

        def keep(frame: Frame) -> None:
            block = next(order)
            if frame.block != block[0]:
                raise ProtocolError(f"storage sent block {frame.block}, expected {block[0]}")
            self.verifier.full_block(geometry, (frame.block, tokens[frame.block]), frame.payload)
            got[frame.block] = frame.payload
            self.counters["storage_read_bytes"] += len(frame.payload)

        read = protocol.control(MessageType.READ, {"geometry": geometry.to_json(),
                                                   "blocks": blocks}, request)
        await self.links[host].exchange([read], keep, len(blocks))

    async def write_block(self, geometry: Geometry, block: Block, payload: bytes) -> None:
        """To every replica that answers; it fails only if none took the block (a read
        later finds it on the replicas that did)."""
        frame = full_block_frame(geometry, block, payload=payload)
        frame.type = MessageType.WRITE
        failures, hosts = {}, placement(block[0], self.storage_hosts, self.replicas)
        for host in hosts:
            try:
                await self.write_links[host].exchange([frame], lambda _ack: None, 1)
            except PeerError as exc:
                failures[host] = f"{host}: {exc}"
                continue
            self.counters["storage_write_bytes"] += len(payload)
        if len(failures) == len(hosts):
            raise PeerError(f"writing block {block[0]}: " + "; ".join(failures.values()))
        if failures:
            self.log.warning("block %d written to fewer replicas, handed off: %s", block[0],
                             "; ".join(failures.values()))
            for host in failures:
                self.hand_off(host, block[0], frame)

    def hand_off(self, host: str, block_id: int, frame: Frame) -> None:
        held = self.handoff.setdefault(host, {})
        held[block_id] = frame
        self.handoff_bytes += len(frame.payload)
        while self.handoff_bytes > HANDOFF_BYTES:       # the oldest hint goes first
            fullest = max(self.handoff.values(), key=len)
            dropped = fullest.pop(next(iter(fullest)))
            self.handoff_bytes -= len(dropped.payload)
            self.log.warning("handoff full: a block stays short of a replica")

    async def replay_handoffs(self) -> None:
        """Write the handed-off blocks to their hosts as soon as these answer again."""
        while True:
            await clock.sleep(HANDOFF_SECONDS)
            for host, held in list(self.handoff.items()):
                while held and self.reachability.why_not(host) is None:
                    block_id, frame = next(iter(held.items()))
                    try:
                        await self.write_links[host].exchange([frame], lambda _ack: None, 1)
                    except PeerError:
                        break                   # still gone: the next round tries again
                    if held.pop(block_id, None) is frame:
                        self.handoff_bytes -= len(frame.payload)
                        self.counters["storage_write_bytes"] += len(frame.payload)
                        self.counters["handed_off_blocks"] += 1

    async def write_blocks(self, geometry: Geometry, blocks: list[tuple[Block, bytes]]) -> None:
        for block, payload in blocks:
            await self.write_block(geometry, block, payload)

    # -- serving GPUs -----------------------------------------------------------------------
    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                handler = {MessageType.LOAD: self.on_load, MessageType.LAYER_READ: self.on_layer_read,
                           MessageType.KV_PUSH: self.on_push, MessageType.FETCH: self.on_fetch,
                           MessageType.PERSIST: self.on_persist,
                           MessageType.DROP: self.on_drop}.get(frame.type)
                if handler is None:
                    raise ProtocolError(f"node does not take {frame.type.name}")
                try:
                    await handler(frame, reader, writer, peer)
                except PeerError as exc:
                    self.counters["errors"] += 1
                    self.log.warning("request %d: %s", frame.request, exc)
                    await protocol.write_frame(writer, protocol.error(str(exc), frame.request))
        except (ProtocolError, ConnectionError) as exc:
            self.counters["errors"] += 1
            self.log.warning("closing connection from %s: %s", peer, exc)
        finally:
            writer.close()

    async def on_load(self, frame: Frame, reader, writer, peer) -> None:
        body = frame.json()
        geometry, blocks = Geometry.from_json(body["geometry"]), parse_blocks(body["blocks"])
        started = clock.now()
        try:
            fulls = await self.read_blocks(frame.request, geometry, blocks)
        except BaseException:
            await self.drop(frame.request)   # give its DRAM back
            raise
        prompt = self.prompt(frame.request)
        prompt.fulls.update(fulls)
        prompt.loaded, prompt.geometry = blocks, geometry
        prompt.check()
        await protocol.write_frame(writer, protocol.control(MessageType.ACK, {
            "seconds": clock.now() - started, "bytes": sum(map(len, fulls.values()))},
            frame.request))

    async def on_layer_read(self, frame: Frame, reader, writer, peer) -> None:
        """One layer of the blocks LOADed for the request (so a read names no blocks)."""
        body = frame.json()
        prompt = self.prompts.get(frame.request)
        if prompt is None or not prompt.loaded:
            raise PeerError(f"request {frame.request}: no KV loaded in {self.host.name}'s DRAM")
        if not 0 <= frame.layer < prompt.geometry.layers:
            raise PeerError(f"layer: got {frame.layer}, expected 0..{prompt.geometry.layers - 1}")
        reply = layer_frame(prompt.geometry, prompt.loaded, frame.layer, frame.request,
                            prompt.fulls)
        sent = await protocol.write_frame(writer, reply)
        key = "layer_bytes_local" if peer[0] in self.local_gpus else "layer_bytes_remote"
        self.counters[key] += sent
        if body.get("release"):
            await self.drop(frame.request)

    async def on_push(self, frame: Frame, reader, writer, peer) -> None:
        """A prefill GPU streams one frame per layer of `blocks`; the prompt is complete
        once every block of `prompt` is in DRAM, loaded or pushed. The appended tokens' KV
        then goes to storage while the prefill engine moves on; the decode's FETCH waits for
        that write, so a failed write fails the request with its reason."""
        body = frame.json()
        geometry = Geometry.from_json(body["geometry"])
        blocks, expected = parse_blocks(body["blocks"]), parse_blocks(body["prompt"])
        persist = parse_blocks(body.get("persist", []))
        self.prompt(frame.request)          # a given-up request is refused before any room
        try:
            prompt = await self.hold(frame.request, geometry.blocks_bytes(blocks))
            for layer in range(geometry.layers):
                data = await protocol.expect(reader, MessageType.LAYER_DATA)
                if data.layer != layer or data.count != len(blocks):
                    raise ProtocolError(f"push of request {frame.request}: got layer "
                                        f"{data.layer} x{data.count}, expected layer {layer} "
                                        f"x{len(blocks)}")
                self.verifier.layer(geometry, blocks, layer, data.payload)
                self.counters["pushed_bytes"] += len(data.payload)
                offset = 0
                for block_id, tokens in blocks:
                    size = geometry.layer_block_bytes(tokens)
                    prompt.layers.setdefault(block_id, {})[layer] = data.payload[offset:offset + size]
                    offset += size
                if layer == geometry.layers - 1:
                    for block_id, _ in blocks:
                        parts = prompt.layers.pop(block_id)
                        prompt.fulls[block_id] = b"".join(parts[i] for i in range(geometry.layers))
                    if persist:   # the appended tokens' KV, for later turns
                        prompt.persisting = asyncio.create_task(self.write_blocks(
                            geometry, [(b, prompt.fulls[b[0]]) for b in persist]))
            # One ACK for the whole push: its layers stream without waiting (as RDMA
            # writes do); a refused layer is answered with an ERROR instead.
            await protocol.write_frame(writer, Frame(MessageType.ACK, frame.request,
                                                     layer=geometry.layers - 1))
        except BaseException:
            await self.drop(frame.request)     # a half-pushed prompt is of no use
            raise
        prompt.expect(expected)

    async def on_fetch(self, frame: Frame, reader, writer, peer) -> None:
        """The decode GPU's bulk H2D: every block of `prompt`, once all are in DRAM."""
        body = frame.json()
        geometry = Geometry.from_json(body["geometry"])
        if frame.request in self.dropped:
            raise PeerError(f"request {frame.request} failed during prefill")
        prompt = self.prompt(frame.request)
        prompt.expect(parse_blocks(body.get("prompt", [])))
        try:
            if prompt.expected:
                await asyncio.wait_for(prompt.complete.wait(), clock.wall(PROMPT_TIMEOUT))
        except asyncio.TimeoutError:
            await self.drop(frame.request)
            raise PeerError(f"request {frame.request}: prompt KV incomplete after "
                            f"{PROMPT_TIMEOUT:.0f} s") from None
        if prompt.dropped:
            raise PeerError(f"request {frame.request} failed during prefill")
        if prompt.persisting:
            try:
                await prompt.persisting
            except PeerError:
                await self.drop(frame.request)
                raise
        for block in prompt.expected:
            sent = await protocol.write_frame(writer, full_block_frame(
                geometry, block, frame.request, prompt.fulls[block[0]]))
            self.counters["fetched_bytes"] += sent
        await protocol.write_frame(writer, Frame(MessageType.ACK, frame.request))
        await self.drop(frame.request)

    async def on_drop(self, frame: Frame, reader, writer, peer) -> None:
        """Forget a request that failed elsewhere, giving its DRAM back."""
        await self.drop(frame.request, failed=True)
        await protocol.write_frame(writer, Frame(MessageType.ACK, frame.request))

    async def on_persist(self, frame: Frame, reader, writer, peer) -> None:
        body = frame.json()
        geometry, blocks = Geometry.from_json(body["geometry"]), parse_blocks(body["blocks"])
        for block in blocks:
            data = await protocol.expect(reader, MessageType.FULL_BLOCK)
            self.verifier.full_block(geometry, block, data.payload)
            await self.write_block(geometry, block, data.payload)
            self.counters["persisted_blocks"] += 1
        await protocol.write_frame(writer, Frame(MessageType.ACK, frame.request))


def _args(parser) -> None:
    parser.add_argument("--dram-bytes", type=float, default=DRAM_BYTES,
                        help="real-cluster DRAM buffer per node (paper: 80 GB for DS models)")


if __name__ == "__main__":
    run(NodeAgent, _args)
