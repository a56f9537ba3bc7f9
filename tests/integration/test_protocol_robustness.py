"""Broken peers against live agents: garbage, damaged headers, wrong checksums, truncated
payloads, corrupt KV with a valid checksum and peers that vanish mid-frame. Each closes
its own connection with a logged reason; the agent goes on serving everyone else, and no
corrupt byte is kept as KV."""

from __future__ import annotations

import json
import socket
import time
import zlib

import pytest
from pyroute2 import netns

from agents.control import call
from agents.engine import ALL_TO_ALL_PORT
from agents.kv import Geometry
from agents.node import NODE_PORT
from agents.protocol import Frame, MessageType, control, header
from agents.storage import STORAGE_PORT
from testbed.agentset import LOG_DIR, RunningCluster
from testbed.profile import load_profile
from testbed.request import RequestSpec, run_request
from testbed.state import FabricRecord
from tests.integration.conftest import topology


@pytest.fixture(scope="module")
def cluster():
    with RunningCluster(topology("1p1d-g2")) as fabric:
        yield fabric


def connect(fabric, client: str, server: str, intf: str, port: int) -> socket.socket:
    """A TCP connection made inside `client`'s namespace to `server`'s `intf`."""
    netns.pushns(f"/proc/{fabric.node(client).netns_pid}/ns/net")
    try:
        sock = socket.create_connection((fabric.plan.host(server).address(intf), port), 5)
    finally:
        netns.popns()
    sock.settimeout(10)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (replies before the close are skipped)."""
    try:
        while chunk := sock.recv(1 << 16):
            del chunk
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def log_says(host: str, text: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (LOG_DIR / f"{host}.log").read_text():
            return True
        time.sleep(0.1)
    return False


def with_bad_payload_crc(frame: Frame) -> bytes:
    return header(frame.type, frame.request, frame.layer, frame.block, len(frame.payload),
                  zlib.crc32(frame.payload) ^ 1, frame.count) + frame.payload


BROKEN = {
    "garbage": (b"GET / HTTP/1.1\r\n\r\n" + bytes(64), "bad magic"),
    "a damaged header": (bytes([*Frame(MessageType.ACK, 7).encode_header()[:5], 0xFF,
                                *Frame(MessageType.ACK, 7).encode_header()[6:]]),
                         "header checksum mismatch"),
    "a wrong payload checksum": (with_bad_payload_crc(control(MessageType.DROP, {}, 9)),
                                 "checksum mismatch on request 9"),
    "a truncated payload": (Frame(MessageType.DROP, 11, payload=b"x" * 1000).encode_header()
                            + b"x" * 10, None),
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("server, client, intf, port", [
    ("n1", "n0g0", "pcie", NODE_PORT), ("st0", "n0", "stor", STORAGE_PORT),
    ("n0g1", "n0g0", "cnic", ALL_TO_ALL_PORT)])
def test_a_broken_peer_loses_its_connection_and_only_its_own(cluster, case, server, client,
                                                             intf, port):
    data, reason = BROKEN[case]
    bystander = connect(cluster, client, server, intf, port)   # a well-behaved peer
    broken = connect(cluster, client, server, intf, port)
    broken.sendall(data)
    if reason is None:                 # the peer vanishes mid-frame
        broken.shutdown(socket.SHUT_WR)
        reason = "truncated payload"
    assert closed_by_peer(broken)
    broken.close()
    assert log_says(server, reason), f"{server} logged no {reason!r}"
    # The agent still serves the connection that was open all along, and new ones.
    if port == ALL_TO_ALL_PORT:
        frame = Frame(MessageType.ALL_TO_ALL, 5, 0, block=5, payload=b"")
        bystander.sendall(frame.encode_header())
        assert bystander.recv(64) == frame.encode_header()
    assert call(cluster.plan.host(server).address("mgmt"), "ping")["host"] == server
    bystander.close()


def test_corrupt_kv_with_a_valid_checksum_is_refused_and_never_kept(cluster):
    """A push whose layer bytes are not the block's (checksummed, so only the verifier can
    tell): the node refuses it, counts the bytes corrupt, keeps nothing; a real request
    then runs through the same node, every byte verified."""
    node = cluster.plan.host("n1").address("mgmt")
    geometry = Geometry.of(load_profile("ds-27b"), cluster.plan.topology.scale)
    blocks = [[(77 << 16), 512]]
    before = call(node, "stats")
    sock = connect(cluster, "n0g0", "n1", "pcie", NODE_PORT)
    push = control(MessageType.KV_PUSH, {"geometry": geometry.to_json(), "blocks": blocks,
                                         "prompt": blocks}, 77)
    layer = Frame(MessageType.LAYER_DATA, 77, 0, block=blocks[0][0], count=1,
                  payload=b"\x00" * geometry.layer_block_bytes(512))
    sock.sendall(push.encode_header() + push.payload + layer.encode_header() + layer.payload)
    assert closed_by_peer(sock)
    sock.close()
    after = call(node, "stats")
    assert after["corrupt_bytes"] - before["corrupt_bytes"] == len(layer.payload)
    assert after["verified_bytes"] == before["verified_bytes"]
    assert after["requests_in_dram"] == 0 and after["buffer_used"] == 0
    assert log_says("n1", "do not verify")
    report = run_request(FabricRecord.read(), cluster.plan,
                         RequestSpec("ds-27b", 4096, 64, 8, "de", "n0g0", "n1g0"))
    assert report["decode"]["prompt_bytes"] == report["hit_kv_bytes"] + report["miss_kv_bytes"]
    assert report["decode"]["verifier"]["corrupt_bytes"] == 0
    assert json.dumps(report)            # the report is whole
