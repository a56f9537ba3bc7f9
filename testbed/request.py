"""One request pushed through the data plane by hand: no scheduler, a chosen prefill GPU,
decode GPU and read path. It is how the data plane is tested and debugged on its own.

The context's KV is seeded into storage first (written on the storage hosts, off the
network); then the prefill engine runs the request layer by layer and the decode engine
fetches the prompt KV, decodes and persists its blocks. Interface and HTB class counters
taken before and after show which NIC carried which bytes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from agents.control import call
from agents.kv import Block, Geometry, placement
from agents.scheduling import read_plan
from testbed import counters
from testbed.errors import TestbedError
from testbed.plan import ClusterPlan
from testbed.profile import load_profile
from testbed.state import FabricRecord

SEED_CHUNK = 2048             # blocks per seed call
PROMPT_BLOCK_TOKENS = 512     # one Full Block of prompt KV (Mooncake's block size)
HIT_BLOCKS, MISS_BLOCKS, GENERATED_BLOCKS = 0x0000, 0x4000, 0x8000


@dataclass(frozen=True)
class RequestSpec:
    model: str
    context: int          # hit tokens: their KV is in storage
    append: int           # miss tokens: prefill computes their KV
    generate: int
    path: str             # "pe", "de", or "split" (about half the hit tokens on each side)
    prefill_gpu: str
    decode_gpu: str
    oracle: bool = False


def split(tokens: int, first_id: int) -> list[Block]:
    blocks, index = [], 0
    while tokens > 0:
        take = min(tokens, PROMPT_BLOCK_TOKENS)
        blocks.append((first_id + index, take))
        tokens -= take
        index += 1
    return blocks


def check_spec(spec: RequestSpec, plan: ClusterPlan) -> None:
    for field, name, role in (("prefill_gpu", spec.prefill_gpu, "prefill"),
                              ("decode_gpu", spec.decode_gpu, "decode")):
        try:
            host = plan.host(name)
        except KeyError:
            raise TestbedError(f"{field}: got {name!r}, expected a GPU host such as "
                               f"{plan.of_kind('gpu')[0].name}") from None
        if host.kind != "gpu" or host.role != role:
            raise TestbedError(f"{field}: got {name!r} ({host.role} {host.kind}), "
                               f"expected a {role} GPU")
    if spec.path not in ("pe", "de", "split"):
        raise TestbedError(f"path: got {spec.path!r}, expected 'pe', 'de' or 'split'")
    for field in ("context", "append", "generate"):
        if getattr(spec, field) < 0:
            raise TestbedError(f"{field}: got {getattr(spec, field)}, expected >= 0")


@dataclass(frozen=True)
class PreparedRequest:
    """A request's identity and blocks, before anything moved."""
    spec: RequestSpec
    request: int
    geometry: Geometry
    hit: list[Block]
    miss: list[Block]
    pe_node: str
    de_node: str

    @property
    def base(self) -> int:
        return self.request << 16


def prepare(plan: ClusterPlan, spec: RequestSpec) -> PreparedRequest:
    check_spec(spec, plan)
    geometry = Geometry.of(load_profile(spec.model), plan.topology.scale)
    request = random.randrange(1, 1 << 46)   # block ids are request << 16 + index (u64)
    base = request << 16
    return PreparedRequest(spec, request, geometry,
                           split(spec.context, base + HIT_BLOCKS),
                           split(spec.append, base + MISS_BLOCKS),
                           plan.host(spec.prefill_gpu).node, plan.host(spec.decode_gpu).node)


def storage_hosts(plan: ClusterPlan, block_id: int) -> list[str]:
    """Where the block lives: its primary storage host first, then its replicas."""
    return placement(block_id, [h.name for h in plan.of_kind("storage")],
                     plan.topology.storage.replicas)


def seed(plan: ClusterPlan, req: PreparedRequest) -> None:
    """Write the context's KV on the storage hosts, off the network."""
    seed_blocks(plan, req.geometry, req.hit)


def seed_blocks(plan: ClusterPlan, geometry: Geometry, blocks: list[Block]) -> None:
    """Write blocks on their storage hosts (and replicas) directly, off the network."""
    by_host: dict[str, list[Block]] = {}
    for block in blocks:
        for host in storage_hosts(plan, block[0]):
            by_host.setdefault(host, []).append(block)
    for host, held in by_host.items():
        for first in range(0, len(held), SEED_CHUNK):   # each call well within its timeout
            call(plan.host(host).address("mgmt"), "seed", geometry=geometry.to_json(),
                 blocks=held[first:first + SEED_CHUNK])


def prefill(plan: ClusterPlan, req: PreparedRequest) -> dict:
    """Run the request's prefill on its prefill GPU."""
    spec = req.spec
    return call(plan.host(spec.prefill_gpu).address("mgmt"), "prefill", request=req.request,
                model=spec.model, hit=req.hit, miss=req.miss, path=spec.path,
                reads=read_plan(req.spec.path, req.hit, req.pe_node, req.de_node,
                                pe_share=0.5),
                decode_node=req.de_node, oracle=spec.oracle)


def decode(plan: ClusterPlan, req: PreparedRequest) -> dict:
    """Run the request's decode on its decode GPU, once its prompt KV is on the way."""
    spec = req.spec
    return call(plan.host(spec.decode_gpu).address("mgmt"), "decode", request=req.request,
                model=spec.model, prompt=req.hit + req.miss, generate=spec.generate,
                generated_block_base=req.base + GENERATED_BLOCKS, oracle=spec.oracle)


def submit(plan: ClusterPlan, req: PreparedRequest) -> dict:
    """Hand the request to the scheduler, which places it; answers once it completed."""
    spec = req.spec
    return call(plan.host("sched").address("mgmt"), "submit", request=req.request,
                model=spec.model, hit=req.hit, miss=req.miss, generate=spec.generate,
                generated_block_base=req.base + GENERATED_BLOCKS)


def execute(record: FabricRecord, plan: ClusterPlan, req: PreparedRequest) -> dict:
    """Prefill, then decode; the report has timings, verified bytes and counter deltas."""
    spec, geometry, scale = req.spec, req.geometry, plan.topology.scale
    mgmt = {h.name: h.address("mgmt") for h in plan.hosts}
    before = counters.snapshot(record)
    prefilled = prefill(plan, req)
    decoded = decode(plan, req)
    moved = counters.delta(before, counters.snapshot(record))

    read_back = {}
    # Oracle names its generated blocks (a later turn counts them as stored) but writes none.
    for block_id, tokens in map(tuple, [] if req.spec.oracle else decoded["persisted"]):
        expected = hashlib.sha256(geometry.full_block((block_id, tokens))).hexdigest()
        for host in storage_hosts(plan, block_id):
            got = call(mgmt[host], "digest", block=block_id)["sha256"]
            read_back[f"{block_id}@{host}"] = got == expected

    return dict(
        request=req.request, spec=spec.__dict__, scale=scale, geometry=geometry.to_json(),
        hit_kv_bytes=geometry.blocks_bytes(req.hit), miss_kv_bytes=geometry.blocks_bytes(req.miss),
        pe_node=req.pe_node, de_node=req.de_node, prefill=prefilled, decode=decoded,
        counters={"/".join(k): v for k, v in moved.items() if v}, read_back=read_back)


def run_request(record: FabricRecord, plan: ClusterPlan, spec: RequestSpec) -> dict:
    req = prepare(plan, spec)
    if not spec.oracle:
        seed(plan, req)
    return execute(record, plan, req)
