"""The data plane on the 1P1D docker fabric: one request through each read path, with its
bytes verified end to end and the NIC counters showing which path carried them."""

from __future__ import annotations

import os

import pytest

from agents.storage import DATA_ROOT
from testbed.request import RequestSpec, execute, prepare, run_request, seed, storage_hosts
from testbed.state import FabricRecord
from testbed.agentset import RunningCluster
from tests.integration.conftest import topology

HEADERS = 0.10   # protocol frames, TCP/IP headers and acknowledgements


@pytest.fixture(scope="module")
def cluster():
    """1P1D on the docker backend, every block stored twice (on st0 and st1)."""
    topo = topology("1p1d", backend="docker")
    topo = topo.model_copy(update={"storage": topo.storage.model_copy(update={"replicas": 2})})
    with RunningCluster(topo) as fabric:
        yield fabric


def request(fabric, path: str, **changes) -> dict:
    spec = dict(model="ds-27b", context=32768, append=429, generate=176, path=path,
                prefill_gpu="n0g0", decode_gpu="n1g0")
    spec.update(changes)
    return run_request(FabricRecord.read(), fabric.plan, RequestSpec(**spec))


def near(measured: int, expected: int) -> bool:
    return expected <= measured <= expected * (1 + HEADERS)


@pytest.mark.parametrize("path", ["pe", "de"])
def test_bytes_verify_and_counters_prove_the_path(cluster, path):
    r = request(cluster, path)
    hit, miss, c = r["hit_kv_bytes"], r["miss_kv_bytes"], r["counters"]
    read_node, other_node = ("n0", "n1") if path == "pe" else ("n1", "n0")

    # Every prompt KV block reached the decode GPU through the DE node and verified.
    assert r["decode"]["prompt_bytes"] == hit + miss
    assert r["decode"]["verifier"]["corrupt_bytes"] == 0
    assert r["prefill"]["verifier"]["corrupt_bytes"] == 0
    # 176 generated tokens: two 64-token blocks persisted, and read back identical.
    assert len(r["decode"]["persisted"]) == 176 // 64
    assert r["read_back"] and all(r["read_back"].values()), r["read_back"]

    print(f"{path}: header overhead on the read SNIC "
          f"{c[f'{read_node}/snic/rx'] / hit - 1:.1%}, on the prefill CNIC (low class) "
          f"{c['n0g0/cnic/rx/low'] / hit - 1:.1%}, on the decode CNIC (low class) "
          f"{c['n1g0/cnic/rx/low'] / (hit + miss) - 1:.1%}")
    # The read side's SNIC received the hit KV; the other node's SNIC read nothing.
    assert near(c.get(f"{read_node}/snic/rx", 0), hit), c
    assert c.get(f"{other_node}/snic/rx", 0) < 0.05 * hit, c
    # The prefill GPU received the hit KV, in the low (KV) class of its CNIC.
    assert r["prefill"]["layer_bytes"] == hit
    assert near(c.get("n0g0/cnic/rx/low", 0), hit), c
    if path == "de":
        # Only the miss tokens' KV went back from the prefill GPU to the decode node.
        assert r["prefill"]["pushed_bytes"] == miss
        assert c.get("n1/pcie/rx", 0) < 0.2 * hit, c
    else:
        assert r["prefill"]["pushed_bytes"] == hit + miss
        assert near(c.get("n1/pcie/rx", 0), hit + miss), c
    # The decode GPU got the whole prompt KV in its low class (the bulk H2D).
    assert near(c.get("n1g0/cnic/rx/low", 0), hit + miss), c


def test_a_split_read_uses_both_snics_and_verifies(cluster):
    """Beyond the paper: half the hit blocks read on each side. The prefill GPU gets both
    halves; only the PE side's half (and the miss KV) goes on to the decode node."""
    r = request(cluster, "split")
    hit, miss, c = r["hit_kv_bytes"], r["miss_kv_bytes"], r["counters"]
    assert r["decode"]["prompt_bytes"] == hit + miss
    assert r["decode"]["verifier"]["corrupt_bytes"] == 0
    assert r["prefill"]["verifier"]["corrupt_bytes"] == 0
    assert r["prefill"]["layer_bytes"] == hit
    pe_half = r["prefill"]["pushed_bytes"] - miss
    assert 0.45 * hit <= pe_half <= 0.55 * hit
    assert near(c.get("n0/snic/rx", 0), pe_half), c
    assert near(c.get("n1/snic/rx", 0), hit - pe_half), c
    assert near(c.get("n1g0/cnic/rx/low", 0), hit + miss), c


def damage(fabric, host: str, block_id: int) -> None:
    """Overwrite four bytes in the middle of a stored block, as a failing disk would."""
    fabric.node(host).cmd(f"printf XXXX | dd of={DATA_ROOT}/{host}/{block_id}.kv "
                          f"bs=1 seek=100 conv=notrunc 2>/dev/null")


def test_oracle_moves_no_kv(cluster):
    r = request(cluster, "pe", oracle=True)
    c = r["counters"]
    assert r["prefill"]["layer_bytes"] == r["prefill"]["pushed_bytes"] == 0
    assert r["decode"]["prompt_bytes"] == 0 and r["read_back"] == {}
    assert len(r["decode"]["persisted"]) == 176 // 64     # named as stored, never written
    for node in ("n0", "n1"):   # at most an ARP exchange
        assert c.get(f"{node}/snic/rx", 0) < 0.001 * r["hit_kv_bytes"], c
    assert c.get("n0g0/cnic/rx/low", 0) < 0.01 * r["hit_kv_bytes"]
    assert c.get("n0g0/cnic/tx/high", 0) > 0           # the all-to-all still runs
    assert r["decode"]["steps"] == 176


def test_missing_and_damaged_blocks_give_clear_errors(cluster):
    """A read of a block that does not exist, or whose file was damaged on disk, fails
    with a reason; the storage agent keeps serving everyone else."""
    plan, record = cluster.plan, FabricRecord.read()
    spec = RequestSpec("ds-27b", 2048, 64, 1, "pe", "n0g0", "n1g0")

    unseeded = prepare(plan, spec)       # nobody wrote its context's blocks
    with pytest.raises(RuntimeError, match=r"block \d+ not found on st\d"):
        execute(record, plan, unseeded)

    # Damage the primary copy of a block: the read is served from its replica.
    one_copy = prepare(plan, spec)
    seed(plan, one_copy)
    primary = storage_hosts(plan, one_copy.hit[0][0])[0]
    damage(cluster, primary, one_copy.hit[0][0])
    survived = execute(record, plan, one_copy)
    assert survived["decode"]["prompt_bytes"] == survived["hit_kv_bytes"] + survived["miss_kv_bytes"]

    # Damage both copies: the read fails, naming the block and what is wrong with it.
    damaged = prepare(plan, spec)
    seed(plan, damaged)
    block_id = damaged.hit[0][0]
    for host in storage_hosts(plan, block_id):
        damage(cluster, host, block_id)
    with pytest.raises(RuntimeError, match=rf"block {block_id} on st\d is damaged"):
        execute(record, plan, damaged)

    again = run_request(record, plan, spec)      # storage still serves everyone else
    assert again["decode"]["prompt_bytes"] == again["hit_kv_bytes"] + again["miss_kv_bytes"]
    assert again["decode"]["verifier"]["corrupt_bytes"] == 0
    from agents.control import call
    for node in ("n0", "n1"):      # the failed requests left nothing in DRAM
        stats = call(plan.host(node).address("mgmt"), "stats")
        assert stats["buffer_used"] == 0 and stats["requests_in_dram"] == 0, stats


def test_de_path_without_appended_tokens(cluster):
    """Nothing to push: the prompt is complete once the decode node has loaded it."""
    r = request(cluster, "de", context=4096, append=0, generate=64)
    assert r["prefill"]["pushed_bytes"] == 0
    assert r["decode"]["prompt_bytes"] == r["hit_kv_bytes"]


def test_concurrent_requests_on_one_prefill_engine(cluster):
    """Four requests at once through the same prefill and decode GPUs, on both paths: all
    complete, every byte verified, they share forward batches, and the nodes' DRAM is empty
    afterwards."""
    from concurrent.futures import ThreadPoolExecutor
    from agents.control import call
    from testbed.request import decode, prefill
    plan = cluster.plan
    engine = plan.host("n0g0").address("mgmt")
    before = call(engine, "stats")
    reqs = [prepare(plan, RequestSpec("ds-27b", 16384, 429, 70, path, "n0g0", "n1g0"))
            for path in ("pe", "de", "pe", "de")]
    for req in reqs:
        seed(plan, req)
    with ThreadPoolExecutor(8) as pool:   # decodes wait for their prompts; prefills batch
        decodes = [pool.submit(decode, plan, req) for req in reqs]
        prefills = [pool.submit(prefill, plan, req) for req in reqs]
        results = [(p.result(), d.result()) for p, d in zip(prefills, decodes)]
    after = call(engine, "stats")
    assert after["prefill_requests"] - before["prefill_requests"] == 4
    assert after["prefill_batches"] - before["prefill_batches"] < 4     # some ran together
    for req, (_, d) in zip(reqs, results):
        assert d["prompt_bytes"] == req.geometry.blocks_bytes(req.hit + req.miss)
        assert d["verifier"]["corrupt_bytes"] == 0
        assert d["steps"] == 70
    for node in ("n0", "n1"):
        stats = call(plan.host(node).address("mgmt"), "stats")
        assert stats["buffer_used"] == 0 and stats["requests_in_dram"] == 0, stats


def agent_pid(host: str) -> int:
    """The pid of the agent serving `host` (its command line names it)."""
    for entry in os.listdir("/proc"):
        try:
            args = open(f"/proc/{entry}/cmdline").read().split("\0")
        except OSError:
            continue
        if len(args) > 2 and args[1] == "-m" and args[2].startswith("agents.") \
                and args[args.index("--host") + 1] == host:
            return int(entry)
    raise AssertionError(f"no agent running for {host}")


def test_engines_run_before_the_other_agents(cluster):
    """The emulated GPUs' timers must not wait for the host's other agents (agents/gpu.py):
    every engine is real-time, inside its container too; nodes, storage and the scheduler
    are not."""
    for host in cluster.plan.hosts:
        if host.kind not in ("gpu", "node", "storage", "scheduler"):
            continue
        policy = os.sched_getscheduler(agent_pid(host.name))
        expected = os.SCHED_RR if host.kind == "gpu" else os.SCHED_OTHER
        assert policy == expected, f"{host.name}: scheduling policy {policy}, expected {expected}"
