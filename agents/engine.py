"""The engine agent: one per GPU host, prefill or decode.

Prefill runs forward batches (FIFO, under a 300 ms attention quota) layer by layer: it loads
layer L+1's KV from the nodes' DRAM while it computes layer L (time from the model profile),
runs the expert-parallel all-to-all with the other prefill GPUs (EF), then sends that layer's
KV to each request's decode node: hit + miss KV on the PE read path, miss-token KV only on
the DE read path.

Decode waits for the complete prompt KV in its node's DRAM, copies it in one bulk H2D,
then runs decode steps (profile time plus an all-to-all with the other decode GPUs, EF),
persisting a Full Block every 64 generated tokens: D2H to the node, which writes it to
storage over its SNIC.

Oracle mode skips every KV transfer, keeping only compute and all-to-all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections import deque

from agents.clock import clock
from agents import protocol
from agents.control import acall, error_text
from prometheus_client import Histogram

from agents.gpu import Gpu, ready_after, run_before_other_agents
from agents.metrics import counter, gauge, verifier_metrics
from agents.kv import Block, Geometry, Verifier, full_block_frame, layer_frame, parse_blocks
from agents.node import DRAM_BYTES, NODE_PORT
from agents.protocol import Frame, MessageType, PeerError, ProtocolError, kv_bytes
from agents.runtime import Agent, run
from testbed.profile import load_profile

ALL_TO_ALL_PORT = 7004
PEER_GONE_SECONDS = 5.0       # an engine that failed an all-to-all sits out this long
FETCH_SECONDS = 0.02          # how often, on average, a group leader pulls work while a scheduler runs
# Each wait between fetches is FETCH_SECONDS times U(1 - FETCH_JITTER, 1 + FETCH_JITTER),
# emulated. A new request goes to whichever prefill group fetches first (§5.2), so the share of
# work each group gets hangs on the leaders' relative phase. Without jitter of its own that
# phase drifts only with each fetch's round trip, wall time that shrinks as 1/TDF. At TDF 16 the
# leaders kept about the phase the start-up gave them; a group that fetches just before another
# takes nearly every new request, and oracle on 2P2D ran prefill batches 4x longer than at
# TDF 8 (mean JCT 2.40 s against 2.25-2.27 s). Jitter in emulated time moves the phase alike
# at every TDF, as the leaders of a real cluster's groups drift.
FETCH_JITTER = 0.5
IDLE_FETCH_SECONDS = 1.0
PREFILL_QUOTA_SECONDS = 0.3  # attention time of one forward batch (paper §5.5)
# Queued requests whose hit KV loads into DRAM ahead of their batch: the next two batches'
# worth, so the SNIC reads while the GPU computes, without filling DRAM with the whole queue.
PREFETCH_SECONDS = 2 * PREFILL_QUOTA_SECONDS
# ...and at most this share of a node's DRAM buffer per prefill GPU, so the loads queued ahead
# never leave a node without room for the pushes of the batch running now.
PREFETCH_DRAM_SHARE = 0.5

# Each request names its model. Reading and validating a profile takes milliseconds, which a
# burst of a hundred requests would spend with the event loop blocked: read each one once
# (profiles are frozen).
profile_of = functools.lru_cache(maxsize=None)(load_profile)

# A layer read's body, with and without releasing the blocks: encoded once, not per read.
LAYER_READ_BODIES = {release: json.dumps({"release": release}).encode()
                     for release in (False, True)}

PERSIST_TOKENS = 64          # decode persists a block every 64 generated tokens (paper §3.3)
# A request loads and pushes on connections of its own (`EngineAgent.own_connection`); this
# many per node are kept from finished requests for the next ones, so that a request costs
# no TCP handshake and teardown at either end.
SPARE_CONNECTIONS = 8


def fetch_waits(leader: str):
    """A leader's waits between fetches (emulated seconds): FETCH_SECONDS on average, each
    jittered by up to FETCH_JITTER of it; seeded by the leader's name, so every leader draws
    its own sequence."""
    rng = random.Random(leader)
    while True:
        yield FETCH_SECONDS * rng.uniform(1 - FETCH_JITTER, 1 + FETCH_JITTER)


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

    def in_step(self) -> bool:
        """Open, and not closed by its peer (a transport reads while idle, so an exited
        peer's close has been seen)."""
        return (self.streams is not None and not self.streams[0].at_eof()
                and not self.streams[1].is_closing())


class EngineAgent(Agent):
    name = "engine"

    async def start(self) -> None:
        run_before_other_agents(self.log)
        self.role = self.host.role
        self.verifier = Verifier()
        self.connections: dict[tuple[str, int, str], Connection] = {}
        self.spare: dict[tuple[str, int, int], list[Connection]] = {}
        self.peers = [h for h in self.plan.of_kind("gpu")
                      if h.role == self.role and h.name != self.host.name]
        self.peers_gone: dict[str, float] = {}    # peer -> until when it sits out
        self.prefill_gpus = [h for h in self.plan.of_kind("gpu") if h.role == "prefill"]
        self.unfinished: dict[int, int] = {}      # request -> tokens
        self.scale = self.plan.topology.scale
        self.gpu = Gpu(self.timeliness.kernel_lateness)
        self.compute_seconds = Histogram(
            "dualpath_engine_layer_compute_seconds",
            "Emulated time of one prefill layer's compute for a batch, or of one decode step",
            ["phase"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5),
            registry=self.registry)
        self.all_to_all_seconds = Histogram(
            "dualpath_engine_all_to_all_seconds", "Emulated time of one all-to-all exchange",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=self.registry)
        self.batch: dict[int, DecodeJob] = {}     # decode: the requests stepping together
        self.hbm_used = 0                         # decode: KV tokens allocated in HBM
        self.hbm_freed = asyncio.Condition()
        self.prefill_queue: deque[PrefillRun] = deque()
        self.prefilling: asyncio.Task | None = None
        self.stepping: asyncio.Task | None = None
        self.counters = {"layer_bytes_received": 0, "kv_bytes_pushed": 0,
                         "prompt_bytes_fetched": 0, "persisted_bytes": 0,
                         "all_to_all_bytes_sent": 0, "all_to_all_bytes_received": 0,
                         "prefill_batches": 0, "prefill_requests": 0, "compute_seconds": 0.0}
        await protocol.serve(self.on_all_to_all, self.host.address("cnic"), ALL_TO_ALL_PORT,
                             protocol.DSCP_EF)
        self.work: dict[int, asyncio.Task] = {}   # request -> the call running its part
        self.running_batch: PrefillBatch | None = None
        self.reports: set[asyncio.Task] = set()    # reads being reported to the scheduler
        self.leading = asyncio.create_task(self.lead())

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "prefill": self.prefill, "decode": self.decode,
                "reset": self.reset, "cancel": self.cancel}

    async def reset(self, _message: dict) -> dict:
        """A new scheduler abandons what an earlier one placed: stop every request's part."""
        return await self.cancel({"requests": list(self.work)})

    async def cancel(self, message: dict) -> dict:
        """Stop these requests' parts (the scheduler gave them up), freeing what they hold."""
        tasks = [self.work[r] for r in map(int, message["requests"]) if r in self.work]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"dropped": len(tasks)}

    def report_read(self, request: int, node: str) -> None:
        """Tell the scheduler that `node` has read its part of a request's hit KV: it leaves
        that node's read queue, though the prefill may still wait for the GPU."""
        async def report() -> None:
            try:
                await acall(self.address("sched", "mgmt"), "read", timeout=10,
                            request=request, node=node)
            except Exception as exc:     # the scheduler then releases it when the prefill ends
                self.log.debug("read of request %d on %s not reported: %s", request, node,
                               error_text(exc))
        task = asyncio.create_task(report())
        self.reports.add(task)          # the loop keeps only a weak reference
        task.add_done_callback(self.reports.discard)

    async def abandon(self, run: "PrefillRun") -> None:
        if run in self.prefill_queue:
            self.prefill_queue.remove(run)
        if self.running_batch and run in self.running_batch.runs:
            self.running_batch.runs.remove(run)
        await run.fail(RuntimeError(f"request {run.request} abandoned"))
        run.done.exception()          # nobody waits for it any more: seen, not reported

    async def stats(self, _message: dict) -> dict:
        return {**self.counters, **self.verifier.stats(), "role": self.role,
                "unfinished_requests": len(self.unfinished),
                "unfinished_tokens": sum(self.unfinished.values())}

    def metrics(self):
        yield gauge("dualpath_engine_unfinished_requests", "Requests assigned and not finished",
                    len(self.unfinished))
        yield gauge("dualpath_engine_unfinished_tokens", "Tokens of the unfinished requests",
                    sum(self.unfinished.values()))
        yield gauge("dualpath_engine_hbm_used_tokens", "Decode: KV tokens allocated in HBM",
                    self.hbm_used)
        yield gauge("dualpath_engine_decode_batch_requests", "Decode: requests in the batch",
                    len(self.batch))
        yield counter("dualpath_engine_gpu_busy_seconds", "Emulated GPU time of every kernel",
                      self.gpu.busy)
        yield counter("dualpath_engine_prefill_batches", "Prefill forward batches run",
                      self.counters["prefill_batches"])
        yield from verifier_metrics(self.verifier, self.scale)

    def geometry(self, profile) -> Geometry:
        return Geometry.of(profile, self.scale)

    def connection(self, host: str, intf: str, port: int, dscp: int, purpose: str) -> Connection:
        key = (host, port, purpose)
        if key not in self.connections:
            self.connections[key] = Connection(self.address(host, intf), port, dscp)
        return self.connections[key]

    def own_connection(self, host: str, intf: str, port: int, dscp: int) -> Connection:
        """A connection for one request alone: a spare one, else a new one."""
        address = self.address(host, intf)
        spare = self.spare.get((address, port, dscp), [])
        while spare:
            conn = spare.pop()
            if conn.in_step():
                return conn
            conn.reset()
        return Connection(address, port, dscp)

    def spare_connection(self, conn: Connection) -> None:
        """A request's own connection, once it is done with it cleanly: kept for the next."""
        spare = self.spare.setdefault((conn.address, conn.port, conn.dscp), [])
        if conn.in_step() and len(spare) < SPARE_CONNECTIONS:
            spare.append(conn)
        else:
            conn.reset()

    async def exchange(self, conn: Connection, frames: list[Frame], replies, *types) -> list[Frame]:
        async with conn.lock:
            reader, writer = await conn.get()
            try:
                await protocol.write_frames(writer, frames)
                return [await protocol.expect(reader, *types) for _ in range(replies)]
            except BaseException:
                conn.reset()   # replies may be left unread: the stream is out of step
                raise

    async def exchange_each(self, conn: Connection, frames: list[Frame], *types,
                            ) -> list[Frame | PeerError]:
        """One reply per frame, pipelined; a peer's ERROR reply is returned in its place, so
        the others still arrive and the stream stays in step."""
        async with conn.lock:
            reader, writer = await conn.get()
            try:
                await protocol.write_frames(writer, frames)
                replies = []
                for _ in frames:
                    try:
                        replies.append(await protocol.expect(reader, *types))
                    except PeerError as exc:
                        replies.append(exc)
                return replies
            except BaseException:
                conn.reset()
                raise

    # -- the group leader: pulls work for its node's engines (§5.1) ------------------------
    async def lead(self) -> None:
        """Rank 0 leads; a higher rank leads while every rank below it is gone."""
        scheduler = self.address("sched", "mgmt")
        group = [h for h in self.plan.of_kind("gpu") if h.node == self.host.node]
        lower = group[:group.index(self.host)]
        waits = fetch_waits(self.host.name)
        while True:
            if lower and await self.any_answers(lower):
                await clock.sleep(IDLE_FETCH_SECONDS)
                continue
            try:
                reply = await acall(scheduler, "fetch", timeout=10, group=self.host.node,
                                    role=self.role, engine=self.host.name)
            except Exception as exc:     # no scheduler running, or one going away mid-reply
                self.log.debug("fetch: %s", error_text(exc))
                await clock.sleep(IDLE_FETCH_SECONDS)
                continue
            for work in reply["assignments"]:
                asyncio.create_task(self.hand_over(scheduler, work))
            await clock.sleep(next(waits))

    async def any_answers(self, hosts) -> bool:
        async def answers(host) -> bool:
            try:
                await acall(host.address("mgmt"), "ping", timeout=IDLE_FETCH_SECONDS)
                return True
            except Exception:            # gone, or going: either way not leading
                return False
        return any(await asyncio.gather(*map(answers, hosts)))

    async def hand_over(self, scheduler: str, work: dict) -> None:
        """Give one assignment to its engine in this group; tell the scheduler how it ended."""
        request = work["args"]["request"]
        try:
            result = await acall(self.address(work["engine"], "mgmt"), work["op"], **work["args"])
            report = {"result": result}
        except Exception as exc:
            report = {"error": error_text(exc)}
        try:
            await acall(scheduler, "complete", request=request, phase=work["op"], **report)
        except Exception as exc:
            self.log.warning("could not report %s of request %d: %s", work["op"], request, exc)

    # -- all-to-all (model-execution traffic, EF) -------------------------------------------
    async def all_to_all(self, request: int, layer: int, total_bytes: int) -> float:
        """One layer's expert-parallel exchange, all of it EF. `total_bytes`: the profile's
        dispatch and combine of every routed copy of this GPU's tokens. Experts spread evenly
        over the group, so the copies routed to this GPU's own experts (one in n) never leave
        it; the rest go out to every peer alike, half of the bytes as the dispatch and the
        same half back as the combine, so that each byte crosses the fabric once."""
        now = clock.now()
        peers = [p for p in self.peers if self.peers_gone.get(p.name, 0.0) <= now]
        if not peers or total_bytes <= 0:
            return 0.0
        started = clock.now()
        share = max(1, total_bytes // (2 * (len(peers) + 1)))

        async def one(peer) -> None:
            conn = self.connection(peer.name, "cnic", ALL_TO_ALL_PORT, protocol.DSCP_EF, "a2a")
            frame = Frame(MessageType.ALL_TO_ALL, request, layer, block=request,
                          payload=kv_bytes(request, layer, share))
            try:
                [back] = await self.exchange(conn, [frame], 1, MessageType.ALL_TO_ALL)
            except (OSError, asyncio.IncompleteReadError, ProtocolError) as exc:
                # A peer that is gone leaves the expert-parallel group, as a real group is
                # rebuilt without a failed rank; it is tried again after PEER_GONE_SECONDS.
                self.peers_gone[peer.name] = clock.now() + PEER_GONE_SECONDS
                self.log.warning("all-to-all without %s for %.0f s: %s", peer.name,
                                 PEER_GONE_SECONDS, exc)
                return
            if back.payload != frame.payload:
                raise ProtocolError(f"all-to-all combine from {peer.name} does not verify")
            self.counters["all_to_all_bytes_sent"] += share
            self.counters["all_to_all_bytes_received"] += len(back.payload)

        if len(peers) == 1:
            await one(peers[0])
        else:
            await asyncio.gather(*(one(p) for p in peers))
        seconds = clock.now() - started
        self.all_to_all_seconds.observe(seconds)
        return seconds

    async def on_all_to_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                if frame.type != MessageType.ALL_TO_ALL or \
                        frame.payload != kv_bytes(frame.block, frame.layer, len(frame.payload)):
                    raise ProtocolError(f"bad all-to-all frame {frame.type.name}")
                self.counters["all_to_all_bytes_received"] += len(frame.payload)
                await protocol.write_frame(writer, frame)   # the combine: same bytes back
                self.counters["all_to_all_bytes_sent"] += len(frame.payload)
        except (ProtocolError, ConnectionError) as exc:
            self.log.warning("closing all-to-all connection from %s: %s", peer, exc)
        finally:
            writer.close()

    # -- prefill ----------------------------------------------------------------------------
    async def prefill(self, m: dict) -> dict:
        """Queue a request for prefill; answers when its KV has left for the decode node."""
        queued = PrefillRun(self, m)
        self.work[queued.request] = asyncio.current_task()
        self.prefill_queue.append(queued)
        self.prefetch()
        if self.prefilling is None or self.prefilling.done():
            self.prefilling = asyncio.create_task(self.prefill_loop())
        try:
            return await asyncio.shield(queued.done)
        except asyncio.CancelledError:
            await self.abandon(queued)
            raise
        finally:
            self.work.pop(queued.request, None)

    async def prefill_loop(self) -> None:
        """Forward batches, one at a time, FIFO, while requests wait. A batch holds requests
        whose KV is available (paper §5.5: the batcher counts a request's tokens "whose KV is
        already available"): it starts once the head's load is done, with the requests behind
        it that have loaded too, so the GPU does not idle while the SNICs fill a whole batch."""
        while self.prefill_queue:
            first, waiting_since = self.prefill_queue[0], clock.now()
            first.start_loading()
            await asyncio.wait([first.loading])
            if not self.prefill_queue or self.prefill_queue[0] is not first:
                continue        # abandoned while it loaded
            batch = [self.prefill_queue.popleft()]
            budget = PREFILL_QUOTA_SECONDS - batch[0].attention_seconds
            while self.prefill_queue:
                head = self.prefill_queue[0]
                if head.profile != batch[0].profile:
                    break       # one model per forward pass
                if head.layerwise != batch[0].layerwise or head.attention_seconds > budget:
                    break
                if head.loading is None or not head.loading.done():
                    break       # FIFO: the batch ends at the first request still loading
                budget -= head.attention_seconds
                batch.append(self.prefill_queue.popleft())
            self.prefetch()
            self.running_batch = PrefillBatch(self, batch, waiting_since)
            try:
                await self.running_batch.run()
            except Exception as exc:   # a bug, not a request's failure: fail the batch loudly
                self.log.exception("prefill batch failed")
                for member in batch:
                    await member.fail(exc)
            finally:
                self.running_batch = None

    def prefetch(self) -> None:
        """Start the loads of the queue's head, up to PREFETCH_SECONDS of attention time and
        this GPU's share of each read node's DRAM."""
        budget = PREFETCH_DRAM_SHARE * DRAM_BYTES / self.scale / len(self.prefill_gpus)
        ahead, held = 0.0, {}
        for queued in self.prefill_queue:
            ahead += queued.attention_seconds
            for node, size in queued.load_bytes().items():
                held[node] = held.get(node, 0) + size
            if ahead > PREFETCH_SECONDS or any(size > budget for size in held.values()):
                break
            queued.start_loading()

    async def drop(self, node: str, request: int) -> None:
        conn = Connection(self.address(node, "pcie"), NODE_PORT, protocol.DSCP_CS1)
        try:
            await self.exchange(conn, [Frame(MessageType.DROP, request)], 1, MessageType.ACK)
        finally:
            conn.reset()

    # -- decode -----------------------------------------------------------------------------
    async def decode(self, m: dict) -> dict:
        """m: request, model, prompt (blocks), generate (tokens), generated_block_base
        (first block id for persisted blocks), oracle. Returns once the request's last token
        is generated; every step runs the whole batch of this engine's decoding requests."""
        request, profile = int(m["request"]), profile_of(m["model"])
        geometry = self.geometry(profile)
        prompt, generate = parse_blocks(m["prompt"]), int(m["generate"])
        oracle = bool(m.get("oracle"))
        need = sum(t for _, t in prompt) + generate
        self.unfinished[request] = need
        self.work[request] = asyncio.current_task()
        started = clock.now()
        fetched = verify_seconds = 0
        h2d_window = None
        allocated = False
        try:
            # HBM is allocated once the prompt is complete in the DE buffer (paper §3.3): a
            # request short of HBM waits there for others to finish.
            await self.allocate_hbm(request, need, int(m.get("hbm_tokens", 1 << 60)))
            allocated = True
            hbm_wait = clock.now() - started
            if not oracle:
                # A fetch waits until the prompt KV is complete: a connection of its own.
                node = Connection(self.address(self.host.node, "pcie"), NODE_PORT,
                                  protocol.DSCP_CS1)
                try:
                    h2d, h2d_start, frames = await self.fetch_prompt(node, request, geometry,
                                                                     prompt)
                    h2d_window = [h2d_start, h2d_start + h2d]
                finally:
                    node.reset()
                arrived = clock.now()
                for block, frame in zip(prompt, frames):
                    self.verifier.full_block(geometry, block, frame.payload)
                    fetched += len(frame.payload)
                verify_seconds = clock.now() - arrived
                self.counters["prompt_bytes_fetched"] += fetched
            else:
                h2d = 0.0
            job = DecodeJob(request, profile, geometry, sum(t for _, t in prompt), generate,
                            int(m["generated_block_base"]), oracle)
            if generate:
                self.batch[request] = job
                if self.stepping is None or self.stepping.done():
                    self.stepping = asyncio.create_task(self.step_loop())
                await job.done
                await asyncio.gather(*job.persisting)
        finally:
            self.work.pop(request, None)
            self.batch.pop(request, None)
            self.unfinished.pop(request, None)
            if allocated:
                async with self.hbm_freed:
                    self.hbm_used -= need
                    self.hbm_freed.notify_all()
        return {"seconds": clock.now() - started, "hbm_wait_seconds": hbm_wait,
                "h2d_seconds": h2d,
                "h2d_window": h2d_window, "verify_seconds": verify_seconds,
                "prompt_bytes": fetched, "steps": len(job.steps),
                "first_token_at": job.first_token_at,
                "second_token_at": job.second_token_at, "end_at": clock.time(),
                "tpot": sum(job.steps) / len(job.steps) if job.steps else 0.0,
                "persisted": job.persisted, "verifier": self.verifier.stats()}

    async def allocate_hbm(self, request: int, need: int, capacity: int) -> None:
        if need > capacity:
            raise ProtocolError(f"request {request}: {need} tokens of KV exceed the decode "
                                f"HBM of {capacity} tokens")
        async with self.hbm_freed:
            await self.hbm_freed.wait_for(lambda: self.hbm_used + need <= capacity)
            self.hbm_used += need

    async def fetch_prompt(self, conn: Connection, request: int, geometry: Geometry,
                           prompt: list[Block]) -> tuple[float, float, list[Frame]]:
        """The bulk H2D: ask the node for the prompt KV, which it sends once complete.
        Returns the copy's seconds from its first byte, that first byte's time (clock.time():
        comparable across hosts), and the blocks."""
        async with conn.lock:
            reader, writer = await conn.get()
            await protocol.write_frame(writer, protocol.control(MessageType.FETCH, {
                "geometry": geometry.to_json(), "prompt": prompt}, request))
            frames, first, first_at = [], None, 0.0
            while True:
                frame = await protocol.expect(reader, MessageType.FULL_BLOCK, MessageType.ACK)
                if first is None:
                    first, first_at = clock.now(), clock.time()
                if frame.type == MessageType.ACK:
                    break
                frames.append(frame)
        if len(frames) != len(prompt):
            raise ProtocolError(f"request {request}: got {len(frames)} prompt blocks, "
                                f"expected {len(prompt)}")
        return clock.now() - first, first_at, frames

    async def step_loop(self) -> None:
        """Decode steps while any request is decoding: one step generates a token for every
        request in the batch, and takes the profile's time for the batch's whole context.
        If a step fails, every request in the batch fails with it (none is left waiting)."""
        try:
            await self._steps()
        except Exception as exc:
            for job in list(self.batch.values()):
                if not job.done.done():
                    job.done.set_exception(exc)
            self.batch.clear()

    async def _steps(self) -> None:
        ready = None      # when the last step's all-to-all finished: the next step follows it
        while self.batch:
            jobs = list(self.batch.values())
            profile = jobs[0].profile
            t = clock.now()
            # One exchange per step carries every layer's all-to-all for the batch's tokens,
            # overlapped with the step's compute, as DeepSeek's decoding splits a batch into
            # two micro-batches whose dispatch and combine hide behind each other's compute
            # (its V3/R1 inference-system overview, deepseek-ai/open-infra-index); the
            # profile's step time is a fit to whole TPOTs, communication included. The step
            # takes the longer of the two, so an all-to-all queued behind KV still
            # lengthens it, while the host's own round trip (about 1.6 ms of wall time, not
            # dilated) no longer adds to every step. The next step's kernel follows this
            # step's all-to-all: the host's time to launch it is made up (agents/gpu.py).
            _, ready = await asyncio.gather(
                self.decode_compute(profile.decode_step_seconds(sum(j.context for j in jobs)),
                                    ready),
                ready_after(self.all_to_all(jobs[0].request, 0, round(
                    profile.all_to_all_bytes(len(jobs)) * profile.layers.value / self.scale))))
            step = clock.now() - t
            for job in jobs:
                if job.request in self.batch:     # not abandoned during the step
                    job.token(step, self)

    async def decode_compute(self, seconds: float, ready: float | None) -> None:
        started = clock.now()
        await self.gpu.run(seconds, ready)
        self.compute_seconds.labels("decode").observe(clock.now() - started)

    async def persist(self, job: "DecodeJob", block: Block) -> None:
        node = self.connection(self.host.node, "pcie", NODE_PORT, protocol.DSCP_CS1, "persist")
        frame = full_block_frame(job.geometry, block, job.request)
        await self.exchange(node, [protocol.control(MessageType.PERSIST, {
            "geometry": job.geometry.to_json(), "blocks": [block]}, job.request), frame],
            1, MessageType.ACK)
        self.counters["persisted_bytes"] += len(frame.payload)


class PrefillRun:
    """One request's part in a prefill: its hit KV loads layer by layer from the nodes that
    read it, and each layer's KV leaves for its decode node. Compute and the all-to-all
    belong to the batch it runs in (`PrefillBatch`).

    m: request, model, hit, miss (blocks), path ('pe'|'de'|'split'), reads (a list of
    [node, blocks]: which node reads which hit blocks, in the order of hit), decode_node,
    oracle, layerwise (default true).
    """

    def __init__(self, engine: EngineAgent, m: dict):
        self.engine = engine
        self.request, self.profile = int(m["request"]), profile_of(m["model"])
        self.geometry = engine.geometry(self.profile)
        self.hit, self.miss = parse_blocks(m["hit"]), parse_blocks(m["miss"])
        context, append = sum(t for _, t in self.hit), sum(t for _, t in self.miss)
        self.layer_seconds = self.profile.prefill_layer_seconds(context, append)
        self.attention_seconds = self.profile.attention_seconds(context, append)
        self.a2a_bytes = round(self.profile.all_to_all_bytes(append) / engine.scale)
        self.oracle, self.path = bool(m.get("oracle")), m["path"]
        self.layerwise = m.get("layerwise", True)
        if self.path not in ("pe", "de", "split"):
            raise ValueError(f"path: got {self.path!r}, expected 'pe', 'de' or 'split'")
        decode_node = m["decode_node"]
        reads = [(node, parse_blocks(blocks)) for node, blocks in m["reads"] if blocks]
        if [b for _, blocks in reads for b in blocks] != self.hit:
            raise ValueError("reads: expected the hit blocks, in order, split between nodes")
        self.sources = [ReadSource(engine, node, blocks, decode_node) for node, blocks in reads]
        self.nodes = {source.node for source in self.sources} | {decode_node}
        self.push_conn = engine.own_connection(decode_node, "pcie", NODE_PORT, protocol.DSCP_CS1)
        # The layer's KV leaves "HBM": the hit KV it received from nodes other than the
        # decode node, and the miss KV it computed (the decode node has its own reads).
        self.sent = [b for source in self.sources if not source.on_decode_node
                     for b in source.blocks] + self.miss
        self.received: dict[int, bytes] = {}     # hit KV per layer, as it arrived in "HBM"
        self.parts: dict[int, dict[str, bytes]] = {}   # a layer's parts so far, per node
        self.timings = dict.fromkeys(("queue", "load_wait", "load", "layer_wait", "compute",
                                      "all_to_all", "push"), 0.0)
        self.moved = {"layer_bytes": 0, "pushed_bytes": 0, "load_window": None}
        self.started = clock.now()
        self.loading: asyncio.Task | None = None
        self.acks: asyncio.Task | None = None     # the push's ACK, once every layer is in
        self.closed = False
        self.done = asyncio.get_running_loop().create_future()
        engine.unfinished[self.request] = context + append

    def finish(self) -> None:
        self._close(clean=True)
        if self.done.done():
            return
        self.done.set_result({"seconds": clock.now() - self.started,
                              "timings": self.timings, **self.moved,
                              "verifier": self.engine.verifier.stats()})

    async def fail(self, error: BaseException) -> None:
        """Neither node may keep KV for a request that will not complete."""
        await asyncio.gather(*(self.engine.drop(n, self.request) for n in self.nodes),
                             return_exceptions=True)
        self._close(clean=False)
        if not self.done.done():
            self.done.set_exception(error)

    def _close(self, clean: bool) -> None:
        """Ends its tasks, and gives its connections back (`clean`: every exchange on them
        answered) or closes them (a failure may have left them out of step)."""
        if self.closed:      # a connection given back may already serve another request
            return
        self.closed = True
        self.engine.unfinished.pop(self.request, None)
        for task in (self.loading, self.acks):
            if task is None:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()      # seen: the request's failure is reported as its error
        for conn in [source.load_conn for source in self.sources] + [self.push_conn]:
            if clean:
                self.engine.spare_connection(conn)
            else:
                conn.reset()

    def load_bytes(self) -> dict[str, int]:
        """The bytes its load puts in each read node's DRAM."""
        if self.oracle:
            return {}
        return {s.node: self.geometry.blocks_bytes(s.blocks) for s in self.sources}

    def start_loading(self) -> None:
        if self.loading is None:
            self.loading = asyncio.create_task(self.load())

    async def loaded(self) -> None:
        """Waits for the load, started now if the queue had not reached it yet."""
        self.start_loading()
        await self.loading

    async def load(self) -> None:
        """The hit KV's Full Blocks, from storage into the read node's DRAM."""
        if self.oracle or not self.hit:
            return
        t, at = clock.now(), clock.time()

        async def load_from(source: ReadSource) -> None:
            await self.engine.exchange(source.load_conn, [
                protocol.control(MessageType.LOAD, {"geometry": self.geometry.to_json(),
                                                    "blocks": source.blocks}, self.request)],
                1, MessageType.ACK)
            self.engine.report_read(self.request, source.node)

        # Every node's load ends before a failure is raised, so that dropping the request
        # afterwards frees what each node loaded.
        results = await asyncio.gather(*map(load_from, self.sources), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.timings["load"] = clock.now() - t
        self.moved["load_window"] = [at, clock.time()]   # clock.time(): comparable across hosts

    def layer_read(self, source: "ReadSource", layer: int) -> Frame:
        # The decode node keeps its copy: it is part of the prompt the decode fetches.
        release = layer == self.geometry.layers - 1 and not source.on_decode_node
        return Frame(MessageType.LAYER_READ, request=self.request, layer=layer,
                     payload=LAYER_READ_BODIES[release])

    def take_layer(self, source: "ReadSource", layer: int, payload: bytes) -> None:
        """A layer of `source`'s blocks arrived in "HBM": verify it, keep what goes on."""
        self.engine.verifier.layer(self.geometry, source.blocks, layer, payload)
        self.engine.counters["layer_bytes_received"] += len(payload)
        self.moved["layer_bytes"] += len(payload)
        self.parts.setdefault(layer, {})[source.node] = b"" if source.on_decode_node else payload
        if len(self.parts[layer]) == len(self.sources):
            parts = self.parts.pop(layer)
            self.received[layer] = b"".join(parts[s.node] for s in self.sources)

    def layer_reads(self, layer: int) -> list["ReadSource"]:
        """The sources whose part of `layer` has not arrived."""
        if self.oracle or not self.hit:
            return []
        arrived = self.parts.get(layer, {})
        return [s for s in self.sources if s.node not in arrived and layer not in self.received]

    async def load_layer(self, layer: int) -> None:
        """This request's missing parts of one layer, each in an exchange of its own."""
        async def read(source: ReadSource) -> None:
            [data] = await self.engine.exchange(source.reads, [self.layer_read(source, layer)],
                                                1, MessageType.LAYER_DATA)
            self.take_layer(source, layer, data.payload)

        await asyncio.gather(*map(read, self.layer_reads(layer)))

    async def push_layer(self, layer: int) -> None:
        """Send one layer's KV to the decode node. Layers stream without a round trip each,
        as RDMA writes do; the node acknowledges the whole push once, which the last layer
        waits for."""
        if self.oracle or not self.sent:
            return
        t = clock.now()
        data = layer_frame(self.geometry, self.miss, layer, self.request)
        if len(self.sent) > len(self.miss):       # hit KV read away from the decode node
            data.payload = self.received.pop(layer, b"") + data.payload
            data.block, data.count = self.sent[0][0], len(self.sent)
        frames = [data]
        if layer == 0:   # the push announces itself with its first layer
            frames.insert(0, protocol.control(MessageType.KV_PUSH, {
                "geometry": self.geometry.to_json(), "blocks": self.sent,
                "prompt": self.hit + self.miss, "persist": self.miss}, self.request))
        reader, writer = await self.push_conn.get()
        if layer == 0:
            self.acks = asyncio.create_task(protocol.expect(reader, MessageType.ACK))
        elif self.acks.done():
            self.acks.result()          # the node refused an earlier layer: stop here
        await protocol.write_frames(writer, frames)
        if layer == self.geometry.layers - 1:
            await self.acks
        self.engine.counters["kv_bytes_pushed"] += len(data.payload)
        self.moved["pushed_bytes"] += len(data.payload)
        self.timings["push"] += clock.now() - t


class ReadSource:
    """A node reading part of a request's hit KV for a prefill, and the connections to it."""

    def __init__(self, engine: EngineAgent, node: str, blocks: list[Block], decode_node: str):
        self.node, self.blocks = node, blocks
        self.on_decode_node = node == decode_node
        self.reads = engine.connection(node, "pcie", NODE_PORT, protocol.DSCP_CS1, "read")
        # A LOAD may wait for DRAM: each request gets a connection of its own for it, so no
        # request waits behind another's.
        self.load_conn = engine.own_connection(node, "pcie", NODE_PORT, protocol.DSCP_CS1)


class PrefillBatch:
    """Requests one prefill engine runs as one forward pass (paper §5.5): every layer
    computes once for all of them, on the GPU lock for the sum of their compute times, with
    one all-to-all carrying all their tokens. A request that fails leaves the batch; the
    others go on."""

    def __init__(self, engine: EngineAgent, runs: list[PrefillRun], waiting_since: float):
        self.engine, self.runs = engine, runs
        self.layers = runs[0].geometry.layers
        self.waiting_since = waiting_since      # when the GPU began to wait for the head's load

    async def run(self) -> None:
        self.engine.counters["prefill_batches"] += 1
        self.engine.counters["prefill_requests"] += len(self.runs)
        await self.each(PrefillRun.loaded)
        loaded = clock.now()
        for member in self.runs:    # waiting for its batch, then for the head's load
            member.timings["queue"] = max(0.0, self.waiting_since - member.started)
            member.timings["load_wait"] = loaded - max(self.waiting_since, member.started)
        if self.runs and self.runs[0].layerwise:
            await self.layerwise()
        elif self.runs:
            await self.whole()
        for member in self.runs:
            member.finish()

    async def each(self, step, *args) -> None:
        """`step` for every request still in the batch, together; failures leave it."""
        runs = list(self.runs)
        results = await asyncio.gather(*(step(member, *args) for member in runs),
                                       return_exceptions=True)
        for member, result in zip(runs, results):
            if isinstance(result, BaseException):
                await self.leave(member, result)

    async def leave(self, member: PrefillRun, error: BaseException) -> None:
        """A failed request leaves the batch (once, whichever step saw it fail first)."""
        if member in self.runs:
            self.runs.remove(member)
            await member.fail(error)

    async def layerwise(self) -> None:
        """Layer L+1's KV loads while layer L computes; layer L's KV leaves while layer L+1
        computes."""
        loading = asyncio.create_task(ready_after(self.load_layer(0)))
        exchanging = pushing = None
        ready = 0.0       # when the next layer's compute had all it waits for
        try:
            for layer in range(self.layers):
                t = clock.now()
                ready = max(ready, await loading)
                self.charge("layer_wait", clock.now() - t)
                if layer + 1 < self.layers:
                    loading = asyncio.create_task(ready_after(self.load_layer(layer + 1)))
                await self.compute(layer, ready)
                ready = 0.0
                if exchanging:
                    ready = await exchanging
                exchanging = asyncio.create_task(ready_after(self.exchange(layer)))
                if pushing:
                    ready = max(ready, await pushing)
                pushing = asyncio.create_task(
                    ready_after(self.each(PrefillRun.push_layer, layer)))
            await exchanging
            await pushing
        finally:
            for task in (loading, exchanging, pushing):
                if task is not None and not task.done():
                    task.cancel()

    async def whole(self) -> None:
        """Without layerwise prefill: all KV into HBM, compute, then all KV out."""
        t = clock.now()
        for layer in range(self.layers):
            await self.load_layer(layer)
        self.charge("layer_wait", clock.now() - t)
        ready = time.monotonic()
        for layer in range(self.layers):
            await self.compute(layer, ready)
            ready = await ready_after(self.exchange(layer))
        for layer in range(self.layers):
            await self.each(PrefillRun.push_layer, layer)

    async def load_layer(self, layer: int) -> None:
        """One layer's hit KV for the whole batch. The reads for one node go out together on
        one connection and their replies come back in order: one round trip per node, not
        per request. If a node's exchange fails, each request still missing its part reads
        it alone, so only a request at fault leaves the batch."""
        by_node: dict[str, list[tuple[PrefillRun, ReadSource]]] = {}
        for member in self.runs:
            for source in member.layer_reads(layer):
                by_node.setdefault(source.node, []).append((member, source))

        failed: dict[PrefillRun, BaseException] = {}

        async def node_reads(pairs: list[tuple[PrefillRun, ReadSource]]) -> None:
            frames = [member.layer_read(source, layer) for member, source in pairs]
            replies = await self.engine.exchange_each(pairs[0][1].reads, frames,
                                                      MessageType.LAYER_DATA)
            for (member, source), reply in zip(pairs, replies):
                try:
                    if isinstance(reply, BaseException):
                        raise reply
                    member.take_layer(source, layer, reply.payload)
                except (PeerError, ProtocolError) as exc:
                    failed.setdefault(member, exc)

        results = await asyncio.gather(*map(node_reads, by_node.values()),
                                       return_exceptions=True)
        for member, error in failed.items():
            await self.leave(member, error)
        if any(isinstance(r, BaseException) for r in results):
            # A broken connection: each request still missing its part reads it alone.
            await self.each(PrefillRun.load_layer, layer)

    async def compute(self, layer: int, ready: float) -> None:
        """The layer's kernel for the whole batch; `ready`: when all it waits for was done
        (wall time, agents/gpu.py)."""
        if not self.runs:
            return
        t = clock.now()
        seconds = sum(member.layer_seconds for member in self.runs)
        await self.engine.gpu.run(seconds, ready)
        self.engine.counters["compute_seconds"] += seconds
        self.engine.compute_seconds.labels("prefill").observe(clock.now() - t)
        self.charge("compute", clock.now() - t)

    async def exchange(self, layer: int) -> None:
        """The layer's expert-parallel all-to-all. Layerwise prefill overlaps it with the
        next layer's compute, as two-micro-batch overlap does on real clusters."""
        if not self.runs:
            return
        lead = self.runs[0].request
        self.charge("all_to_all", await self.engine.all_to_all(
            lead, layer, sum(member.a2a_bytes for member in self.runs)))

    def charge(self, phase: str, seconds: float) -> None:
        for member in self.runs:
            member.timings[phase] += seconds


class DecodeJob:
    """One request in a decode engine's batch."""

    def __init__(self, request: int, profile, geometry: Geometry, context: int, generate: int,
                 block_base: int, oracle: bool):
        self.request, self.profile, self.geometry = request, profile, geometry
        self.context, self.generate, self.block_base, self.oracle = context, generate, block_base, oracle
        self.generated = 0
        self.steps: list[float] = []
        self.first_token_at: float | None = None
        self.second_token_at: float | None = None
        self.persisted: list[Block] = []
        self.persisting: list[asyncio.Task] = []
        self.done = asyncio.get_running_loop().create_future()

    def token(self, step_seconds: float, engine: EngineAgent) -> None:
        self.generated += 1
        self.context += 1
        self.steps.append(step_seconds)
        if self.first_token_at is None:
            self.first_token_at = clock.time()
        elif self.second_token_at is None:
            self.second_token_at = clock.time()
        if self.generated % PERSIST_TOKENS == 0:
            # Persisted as soon as the block is full, while decoding goes on (D2H, then
            # the node writes it to storage). Oracle moves no KV but still counts the
            # block as stored, so its next turn hits it as the other policies' do.
            block = (self.block_base + len(self.persisted), PERSIST_TOKENS)
            self.persisted.append(block)
            if not self.oracle:
                self.persisting.append(asyncio.create_task(engine.persist(self, block)))
        if self.generated >= self.generate:
            engine.batch.pop(self.request, None)
            self.done.set_result(None)


if __name__ == "__main__":
    run(EngineAgent)
