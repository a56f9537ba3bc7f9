"""The storage agent: Full Blocks in real files on disk, served over the storage fabric.

Each block lives in DATA/<id>.kv: its CRC-32, then the Full Block. Reads check the file
against its checksum before a byte leaves, then send it (sendfile for blocks of 1 MiB and
more, a plain write below); a missing or damaged block is answered with ERROR and a reason,
never with garbage. Writes land in a temporary
file and are renamed into place, so a reader never sees half a block.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import struct
import zlib
from pathlib import Path

from agents import protocol
from agents.kv import Geometry, parse_blocks
from agents.protocol import ALL_LAYERS, Frame, MessageType, ProtocolError, header
from agents.runtime import Agent, run

STORAGE_PORT = 7001
DATA_ROOT = Path("/var/tmp/dualpath-testbed")
CRC = struct.Struct("!I")      # a block file is its CRC-32, then the Full Block
# Below this a read and a write cost less than a sendfile round trip through the event loop.
SENDFILE_MIN = 1 << 20


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

    # -- files ------------------------------------------------------------------------------
    def _path(self, block_id: int) -> Path:
        return self.data / f"{block_id}.kv"

    def _store(self, block_id: int, payload: bytes) -> None:
        path = self._path(block_id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(CRC.pack(zlib.crc32(payload)))
            f.write(payload)
        os.replace(tmp, path)

    def _open_checked(self, block_id: int, length: int) -> tuple[int, int, bytes | None]:
        """(fd, checksum, payload) of a block whose file is whole and undamaged; the payload
        is read only for blocks small enough to send by a plain write."""
        try:
            fd = os.open(self._path(block_id), os.O_RDONLY)
        except FileNotFoundError:
            raise BlockMissing(f"block {block_id} not found on {self.host.name}") from None
        try:
            size = os.fstat(fd).st_size
            if size != CRC.size + length:
                raise BlockMissing(f"block {block_id} on {self.host.name} is damaged: "
                                   f"{size - CRC.size} bytes on disk, expected {length}")
            if length < SENDFILE_MIN:
                data = os.pread(fd, size, 0)
                [recorded], payload = CRC.unpack_from(data), data[CRC.size:]
                actual = zlib.crc32(payload)
            else:
                payload = None
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as view:
                    [recorded] = CRC.unpack_from(view)
                    with memoryview(view)[CRC.size:] as body:
                        actual = zlib.crc32(body)
            if actual != recorded:
                raise BlockMissing(f"block {block_id} on {self.host.name} is damaged: "
                                   f"checksum mismatch")
            return fd, actual, payload
        except BaseException:
            os.close(fd)
            raise

    async def digest(self, message: dict) -> dict:
        """The SHA-256 of a stored block's bytes, read back from disk."""
        try:
            data = self._path(int(message["block"])).read_bytes()
        except FileNotFoundError:
            raise BlockMissing(f"block {message['block']} not found on {self.host.name}") from None
        return {"sha256": hashlib.sha256(data[CRC.size:]).hexdigest()}

    # -- serving ----------------------------------------------------------------------------
    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                if frame.type == MessageType.READ:
                    await self._read(frame, writer)
                elif frame.type == MessageType.WRITE:
                    try:
                        self._store(frame.block, frame.payload)
                    except OSError as exc:
                        self.served["errors"] += 1
                        await protocol.write_frame(writer, protocol.error(
                            f"block {frame.block} not stored on {self.host.name}: {exc}",
                            frame.request))
                        continue
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
        """One FULL_BLOCK per requested block, in order; at the first block that is missing
        or damaged, an ERROR with the reason instead, and nothing more."""
        body = frame.json()
        geometry = Geometry.from_json(body.get("geometry"))
        loop = asyncio.get_running_loop()
        for block_id, tokens in parse_blocks(body.get("blocks")):
            length = geometry.full_block_bytes(tokens)
            try:
                fd, checksum, payload = self._open_checked(block_id, length)
            except BlockMissing as exc:
                self.served["errors"] += 1
                self.log.warning("read of request %d: %s", frame.request, exc)
                await protocol.write_frame(writer, protocol.error(str(exc), frame.request))
                return
            head = header(MessageType.FULL_BLOCK, frame.request, ALL_LAYERS, block_id, length,
                          checksum, 1)
            with os.fdopen(fd, "rb") as f:
                if payload is not None:
                    writer.writelines([head, payload])
                    await writer.drain()
                else:
                    writer.write(head)
                    await loop.sendfile(writer.transport, f, CRC.size, length)
            self.served["read_blocks"] += 1
            self.served["read_bytes"] += length


if __name__ == "__main__":
    run(StorageAgent)
