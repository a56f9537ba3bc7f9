"""The storage agent: Full Blocks in real files on disk, served over the storage fabric.

Each block lives in DATA/<id>.kv with its CRC-32 in DATA/<id>.crc. Reads check the file
against its checksum before a byte leaves, then send it with sendfile; a missing or damaged
block is answered with ERROR and a reason, never with garbage. Writes land in a temporary
file and are renamed into place, so a reader never sees half a block.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import socket
import zlib
from pathlib import Path

from agents import protocol
from agents.kv import Geometry, parse_blocks
from agents.protocol import ALL_LAYERS, HEADER, MAGIC, VERSION, Frame, MessageType, ProtocolError
from agents.runtime import Agent, run

STORAGE_PORT = 7001
DATA_ROOT = Path("/var/tmp/dualpath-testbed")


class BlockMissing(Exception):
    pass


class StorageAgent(Agent):
    name = "storage"

    async def start(self) -> None:
        self.data = DATA_ROOT / self.host.name
        self.data.mkdir(parents=True, exist_ok=True)
        self.served = {"read_blocks": 0, "read_bytes": 0, "written_blocks": 0,
                       "written_bytes": 0, "errors": 0}
        await protocol.serve(self.session, self.host.address("stor"), STORAGE_PORT,
                             protocol.DSCP_CS1)

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "seed": self.seed, "digest": self.digest}

    async def stats(self, _message: dict) -> dict:
        files = list(self.data.glob("*.kv"))
        return {**self.served, "blocks_on_disk": len(files),
                "bytes_on_disk": sum(f.stat().st_size for f in files)}

    async def seed(self, message: dict) -> dict:
        """Write blocks straight to disk (no network): the KV a workload starts with."""
        geometry = Geometry.from_json(message["geometry"])
        blocks = parse_blocks(message["blocks"])
        for block in blocks:
            self._store(block[0], geometry.full_block(block))
        return {"seeded": len(blocks)}

    async def digest(self, message: dict) -> dict:
        """The SHA-256 of a stored block, read back from disk."""
        kv, _ = self._paths(int(message["block"]))
        try:
            return {"sha256": hashlib.sha256(kv.read_bytes()).hexdigest()}
        except FileNotFoundError:
            raise BlockMissing(f"block {message['block']} not found on {self.host.name}") from None

    # -- files ------------------------------------------------------------------------------
    def _paths(self, block_id: int) -> tuple[Path, Path]:
        return self.data / f"{block_id}.kv", self.data / f"{block_id}.crc"

    def _store(self, block_id: int, payload: bytes) -> None:
        kv, crc = self._paths(block_id)
        for path, content in ((kv, payload), (crc, str(zlib.crc32(payload)).encode())):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)

    def _checked(self, block_id: int, length: int) -> tuple[int, int]:
        """(file descriptor, checksum) of a block whose file is whole and undamaged."""
        kv, crc = self._paths(block_id)
        try:
            fd = os.open(kv, os.O_RDONLY)
        except FileNotFoundError:
            raise BlockMissing(f"block {block_id} not found on {self.host.name}") from None
        try:
            size = os.fstat(fd).st_size
            if size != length:
                raise BlockMissing(f"block {block_id} on {self.host.name} is damaged: "
                                   f"{size} bytes on disk, expected {length}")
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
                actual = zlib.crc32(view)
            try:
                recorded = int(crc.read_text())
            except (OSError, ValueError):
                raise BlockMissing(f"block {block_id} on {self.host.name} has no checksum") \
                    from None
            if actual != recorded:
                raise BlockMissing(f"block {block_id} on {self.host.name} is damaged: "
                                   f"checksum mismatch")
            return fd, actual
        except BaseException:
            os.close(fd)
            raise

    # -- serving ----------------------------------------------------------------------------
    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                if frame.type == MessageType.READ:
                    await self._read(frame, writer)
                elif frame.type == MessageType.WRITE:
                    self._store(frame.block, frame.payload)
                    self.served["written_blocks"] += 1
                    self.served["written_bytes"] += len(frame.payload)
                    await protocol.write_frame(writer, Frame(MessageType.ACK, frame.request,
                                                             block=frame.block))
                else:
                    raise ProtocolError(f"storage does not take {frame.type.name}")
        except (ProtocolError, ConnectionError) as exc:
            self.served["errors"] += 1
            self.log.warning("closing connection from %s: %s", peer, exc)
        finally:
            writer.close()

    async def _read(self, frame: Frame, writer: asyncio.StreamWriter) -> None:
        body = frame.json()
        geometry = Geometry.from_json(body.get("geometry"))
        sock = writer.get_extra_info("socket")
        # Corked, each header leaves in the same packet as its block (sent by sendfile).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            await self._send_blocks(frame, geometry, parse_blocks(body.get("blocks")), writer)
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    async def _send_blocks(self, frame: Frame, geometry: Geometry, blocks,
                           writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        for block_id, tokens in blocks:
            length = geometry.full_block_bytes(tokens)
            try:
                fd, checksum = self._checked(block_id, length)
            except BlockMissing as exc:
                self.served["errors"] += 1
                self.log.warning("read of request %d: %s", frame.request, exc)
                await protocol.write_frame(writer, protocol.error(str(exc), frame.request))
                return
            with os.fdopen(fd, "rb") as f:
                writer.write(HEADER.pack(MAGIC, VERSION, MessageType.FULL_BLOCK, frame.request,
                                         ALL_LAYERS, block_id, length, checksum, 1))
                await writer.drain()
                await loop.sendfile(writer.transport, f, 0, length)
            self.served["read_blocks"] += 1
            self.served["read_bytes"] += length


if __name__ == "__main__":
    run(StorageAgent)
