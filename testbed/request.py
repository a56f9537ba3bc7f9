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
from testbed import counters
from testbed.errors import TestbedError
from testbed.plan import ClusterPlan
from testbed.profile import ModelProfile, load_profile
from testbed.state import FabricRecord

PROMPT_BLOCK_TOKENS = 512     # one Full Block of prompt KV (Mooncake's block size)
HIT_BLOCKS, MISS_BLOCKS, GENERATED_BLOCKS = 0x0000, 0x4000, 0x8000


@dataclass(frozen=True)
class RequestSpec:
    model: str
    context: int          # hit tokens: their KV is in storage
    append: int           # miss tokens: prefill computes their KV
    generate: int
    path: str             # "pe" or "de"
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
    if spec.path not in ("pe", "de"):
        raise TestbedError(f"path: got {spec.path!r}, expected 'pe' or 'de'")
    for field in ("context", "append", "generate"):
        if getattr(spec, field) < 0:
            raise TestbedError(f"{field}: got {getattr(spec, field)}, expected >= 0")


def run_request(record: FabricRecord, plan: ClusterPlan, spec: RequestSpec) -> dict:
    check_spec(spec, plan)
    profile: ModelProfile = load_profile(spec.model)
    scale = plan.topology.scale
    geometry = Geometry(profile.layers.value, profile.kv_bytes_per_token_layer.value / scale)
    request = random.randrange(1, 1 << 30)
    base = request << 16
    hit, miss = split(spec.context, base + HIT_BLOCKS), split(spec.append, base + MISS_BLOCKS)
    pe_node = plan.host(spec.prefill_gpu).node
    de_node = plan.host(spec.decode_gpu).node
    mgmt = {h.name: h.address("mgmt") for h in plan.hosts}
    storage_hosts = [h.name for h in plan.of_kind("storage")]
    replicas = plan.topology.storage.replicas

    if hit and not spec.oracle:
        by_host: dict[str, list[Block]] = {}
        for block in hit:
            for host in placement(block[0], storage_hosts, replicas):
                by_host.setdefault(host, []).append(block)
        for host, blocks in by_host.items():
            call(mgmt[host], "seed", geometry=geometry.to_json(), blocks=blocks)

    before = counters.snapshot(record)
    prefill = call(mgmt[spec.prefill_gpu], "prefill", request=request,
                   geometry=geometry.to_json(), hit=hit, miss=miss, path=spec.path,
                   read_node=pe_node if spec.path == "pe" else de_node, decode_node=de_node,
                   layer_seconds=profile.prefill_layer_seconds(spec.context, spec.append),
                   all_to_all_bytes=round(profile.all_to_all_bytes(spec.append) / scale),
                   oracle=spec.oracle)
    decode = call(mgmt[spec.decode_gpu], "decode", request=request,
                  geometry=geometry.to_json(), prompt=hit + miss, generate=spec.generate,
                  step_seconds=profile.decode_step_seconds(spec.context + spec.append),
                  all_to_all_bytes=round(profile.all_to_all_bytes(1) * profile.layers.value / scale),
                  generated_block_base=base + GENERATED_BLOCKS, oracle=spec.oracle)
    moved = counters.delta(before, counters.snapshot(record))

    read_back = {}
    for block_id, tokens in map(tuple, decode["persisted"]):
        expected = hashlib.sha256(geometry.full_block((block_id, tokens))).hexdigest()
        for host in placement(block_id, storage_hosts, replicas):
            got = call(mgmt[host], "digest", block=block_id)["sha256"]
            read_back[f"{block_id}@{host}"] = got == expected

    return dict(
        request=request, spec=spec.__dict__, scale=scale, geometry=geometry.to_json(),
        hit_kv_bytes=geometry.blocks_bytes(hit), miss_kv_bytes=geometry.blocks_bytes(miss),
        pe_node=pe_node, de_node=de_node, prefill=prefill, decode=decode,
        counters={"/".join(k): v for k, v in moved.items() if v}, read_back=read_back)
