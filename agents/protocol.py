"""The agents' shared language: framed messages over TCP, carrying verifiable KV bytes.

Every message is a fixed 36-byte header followed by `length` payload bytes:

    offset size field     meaning
    0      2    magic     b"DP"
    2      1    version   2
    3      1    type      MessageType
    4      8    request   request id (0 when none)
    12     2    layer     layer index (0xFFFF: all layers, i.e. a Full Block)
    14     8    block     first block id the payload covers (0 when none)
    22     4    length    payload bytes (at most MAX_PAYLOAD)
    26     4    checksum  CRC-32 of the payload
    30     2    count     number of blocks the payload covers (KV messages), else 0
    32     4    hcrc      CRC-32 of the 32 bytes before it: a damaged header is refused,
                          never read as another frame

KV payloads are derived from the identity of each block: `kv_bytes(block, layer, length)`
gives the only valid bytes of one layer of one block, so any receiver verifies what it got
without a side channel. A Full Block is its layers' Layer Blocks concatenated in layer
order, so no layout conversion is ever needed. Control payloads (LOAD, READ, ...) are JSON;
ERROR payloads are a UTF-8 reason.

Every socket is marked with the DSCP of its traffic class (`open_connection`, `serve`):
KV bytes CS1, model-execution traffic (all-to-all) EF.

Who sends what:
  READ      node -> storage     JSON {"blocks": [[id, tokens], ...]}; answered by one
                                FULL_BLOCK per block, or ERROR
  WRITE     node -> storage     payload is one Full Block; answered by ACK or ERROR
  LOAD      engine -> node      JSON {"blocks": [[id, tokens], ...]}: read these Full Blocks
                                from storage into DRAM; answered by ACK or ERROR
  LAYER_READ  engine -> node    header layer L, JSON {"release": bool}: layer L of the blocks
                                LOADed for the request, answered by LAYER_DATA; release
                                frees them from DRAM after this read
  LAYER_DATA  either way        one layer of `count` consecutive blocks of the request
  KV_PUSH   PE engine -> DE node  LAYER_DATA frames for a request; answered by one ACK once all are in
  FETCH     DE engine -> node   JSON {"geometry", "prompt": blocks}: once every prompt block
                                is in DRAM (loaded or pushed), one FULL_BLOCK each, then ACK;
                                the node then frees them
  PERSIST   DE engine -> node   a Full Block of generated tokens; the node writes it to
                                storage and answers ACK
  DROP      engine -> node      forget a failed request, freeing its DRAM; ACK
  ALL_TO_ALL  engine <-> engine  derived bytes standing for expert-parallel dispatch; the
                                peer sends the same frame back (the combine)
  ACK, ERROR                     replies
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import random
import socket
import struct
import zlib
from dataclasses import dataclass

from agents.clock import clock

MAGIC = b"DP"
VERSION = 2
HEADER = struct.Struct("!2sBBQHQIIH")    # the fields; their CRC-32 follows
HEADER_CRC = struct.Struct("!I")
HEADER_SIZE = HEADER.size + HEADER_CRC.size
assert HEADER_SIZE == 36
MAX_PAYLOAD = 64 * 1024 * 1024
ALL_LAYERS = 0xFFFF

DSCP_EF = 46    # model-execution traffic: high class on every CNIC
DSCP_CS1 = 8    # KV-cache traffic, loopback copies included: low class


class MessageType(enum.IntEnum):
    READ = 1
    WRITE = 2
    FULL_BLOCK = 3
    LOAD = 4
    LAYER_READ = 5
    LAYER_DATA = 6
    KV_PUSH = 7
    FETCH = 8
    PERSIST = 9
    ALL_TO_ALL = 10
    ACK = 11
    ERROR = 12
    DROP = 13


class ProtocolError(Exception):
    """A malformed, truncated or corrupt message: the connection that sent it is closed."""


class PeerError(Exception):
    """The peer answered ERROR; the message is its reason."""


@dataclass
class Frame:
    type: MessageType
    request: int = 0
    layer: int = 0
    block: int = 0
    count: int = 0
    payload: bytes = b""

    def encode_header(self) -> bytes:
        return header(self.type, self.request, self.layer, self.block, len(self.payload),
                      zlib.crc32(self.payload), self.count)

    def json(self) -> dict:
        try:
            return json.loads(self.payload)
        except ValueError as exc:
            raise ProtocolError(f"{self.type.name}: payload is not JSON ({exc})") from None


def header(type_: MessageType, request: int, layer: int, block: int, length: int,
           checksum: int, count: int) -> bytes:
    """A frame's header, for a payload of `length` bytes whose CRC-32 is `checksum`."""
    fields = HEADER.pack(MAGIC, VERSION, type_, request, layer, block, length, checksum, count)
    return fields + HEADER_CRC.pack(zlib.crc32(fields))


def control(type_: MessageType, body: dict, request: int = 0) -> Frame:
    return Frame(type_, request=request, payload=json.dumps(body).encode())


def error(reason: str, request: int = 0) -> Frame:
    return Frame(MessageType.ERROR, request=request, payload=reason.encode()[:4096])


# -- verifiable KV bytes -----------------------------------------------------------------------

_PATTERN_SIZE = 1 << 16
_PATTERN = random.Random(0x4450).randbytes(2 * _PATTERN_SIZE)


def _offset(block: int, layer: int) -> int:
    return zlib.crc32(struct.pack("!QH", block, layer)) % _PATTERN_SIZE


def kv_bytes(block: int, layer: int, length: int) -> bytes:
    """The bytes of layer `layer` of block `block`: a window into a fixed random pattern,
    placed by a hash of the identity, stamped with the identity itself."""
    stamp = struct.pack("!QH", block, layer)
    start = _offset(block, layer)
    if length <= _PATTERN_SIZE:   # the common case, in one copy
        return (stamp + _PATTERN[start:start + length])[:length]
    body = bytearray(stamp)
    while len(body) < length:
        take = min(length - len(body), _PATTERN_SIZE)
        body += _PATTERN[start:start + take]
    return bytes(body)


# -- framing over asyncio streams ---------------------------------------------------------------

async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean end of stream. Raises ProtocolError otherwise."""
    try:
        data = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError(f"truncated header ({len(exc.partial)} of {HEADER_SIZE} bytes)") \
            from None
    magic, version, type_, request, layer, block, length, checksum, count = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad magic/version {magic!r}/{version}")
    [header_crc] = HEADER_CRC.unpack_from(data, HEADER.size)
    if zlib.crc32(data[:HEADER.size]) != header_crc:
        raise ProtocolError("header checksum mismatch")
    try:
        type_ = MessageType(type_)
    except ValueError:
        raise ProtocolError(f"unknown message type {type_}") from None
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{type_.name}: length {length} exceeds {MAX_PAYLOAD}")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"{type_.name}: truncated payload ({len(exc.partial)} of "
                            f"{length} bytes)") from None
    if zlib.crc32(payload) != checksum:
        raise ProtocolError(f"{type_.name}: checksum mismatch on request {request} "
                            f"block {block} layer {layer}")
    return Frame(type_, request, layer, block, count, payload)


async def write_frames(writer: asyncio.StreamWriter, frames: list[Frame]) -> int:
    """Send frames back to back in one send: no header-only packet, and one system call
    for a batch's reads to one node, which each cost a send through the emulated fabric's
    whole path. Returns the bytes put on the wire (headers included)."""
    parts = []
    for frame in frames:
        parts += (frame.encode_header(), frame.payload)
    writer.writelines(parts)
    await writer.drain()
    return sum(map(len, parts))


async def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> int:
    """Send one frame; returns the bytes put on the wire (header included)."""
    return await write_frames(writer, [frame])


async def expect(reader: asyncio.StreamReader, *types: MessageType) -> Frame:
    frame = await read_frame(reader)
    if frame is None:
        raise ProtocolError(f"peer closed the connection, expected {'/'.join(t.name for t in types)}")
    if frame.type == MessageType.ERROR:
        raise PeerError(frame.payload.decode(errors="replace"))
    if frame.type not in types:
        raise ProtocolError(f"got {frame.type.name}, expected {'/'.join(t.name for t in types)}")
    return frame


# -- sockets marked with their traffic class ---------------------------------------------------

# A peer that vanishes (its link down, its host gone) leaves no FIN or RST behind: the
# kernel gives up on the connection once sent data or keepalive probes have gone unanswered
# this long, and the waiting side sees a ConnectionError instead of hanging for minutes. A
# live peer acknowledges probes however busy it is, and a short link flap is survived.
# Emulated seconds, like every duration: the kernel is given them in wall time.
DEAD_PEER_SECONDS = 15
KEEPALIVE_IDLE_SECONDS, KEEPALIVE_INTERVAL_SECONDS = 5, 2


def _mark(sock: socket.socket, dscp: int) -> None:
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Options of a listening socket are inherited by the connections it accepts.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE,
                    math.ceil(clock.wall(KEEPALIVE_IDLE_SECONDS)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL,
                    math.ceil(clock.wall(KEEPALIVE_INTERVAL_SECONDS)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT,
                    (DEAD_PEER_SECONDS - KEEPALIVE_IDLE_SECONDS) // KEEPALIVE_INTERVAL_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    round(clock.wall(DEAD_PEER_SECONDS) * 1000))


async def open_connection(host: str, port: int, dscp: int,
                          timeout: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection whose every packet, the handshake included, carries `dscp`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _mark(sock, dscp)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), clock.wall(timeout))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=MAX_PAYLOAD)


async def serve(handler, address: str, port: int, dscp: int) -> asyncio.base_events.Server:
    """A listening socket marked with `dscp`; accepted connections inherit the mark."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _mark(sock, dscp)
    sock.bind((address, port))
    sock.setblocking(False)
    return await asyncio.start_server(handler, sock=sock, limit=MAX_PAYLOAD)
