"""KV-cache geometry in emulated bytes, and the checks every receiver runs on KV it gets.

A block is (id, tokens). One layer of it is `layer_block_bytes(tokens)` bytes; the Full Block
is its layers concatenated. Sizes are real-cluster sizes divided by the scale, so a layer
block of 512 tokens of a 656 B/token/layer model at scale 4000 is 84 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents.protocol import ALL_LAYERS, Frame, MessageType, ProtocolError, kv_bytes

Block = tuple[int, int]   # (block id, tokens)


@dataclass(frozen=True)
class Geometry:
    layers: int
    layer_bytes_per_token: float     # scaled: real KV bytes per token per layer / scale

    @classmethod
    def of(cls, profile, scale: float) -> "Geometry":
        """A model profile's KV geometry, with bytes divided by the scale."""
        return cls(profile.layers.value, profile.kv_bytes_per_token_layer.value / scale)

    @classmethod
    def from_json(cls, value) -> "Geometry":
        try:
            layers, per_token = value
            return cls(int(layers), float(per_token))
        except (TypeError, ValueError):
            raise ProtocolError(f"geometry: got {value!r}, expected [layers, bytes per token]") \
                from None

    def to_json(self) -> list:
        return [self.layers, self.layer_bytes_per_token]

    def layer_block_bytes(self, tokens: int) -> int:
        return max(1, round(tokens * self.layer_bytes_per_token))

    def full_block_bytes(self, tokens: int) -> int:
        return self.layers * self.layer_block_bytes(tokens)

    def full_block(self, block: Block) -> bytes:
        block_id, tokens = block
        size = self.layer_block_bytes(tokens)
        return b"".join(kv_bytes(block_id, layer, size) for layer in range(self.layers))

    def layer_of(self, full: bytes, tokens: int, layer: int) -> bytes:
        size = self.layer_block_bytes(tokens)
        return full[layer * size:(layer + 1) * size]

    def blocks_bytes(self, blocks: list[Block]) -> int:
        return sum(self.full_block_bytes(tokens) for _, tokens in blocks)


def parse_blocks(value) -> list[Block]:
    try:
        return [(int(b), int(t)) for b, t in value]
    except (TypeError, ValueError):
        raise ProtocolError(f"blocks: got {str(value)[:80]!r}, expected [[id, tokens], ...]") \
            from None


def full_block_frame(geometry: Geometry, block: Block, request: int = 0,
                     payload: bytes | None = None) -> Frame:
    return Frame(MessageType.FULL_BLOCK, request=request, layer=ALL_LAYERS, block=block[0],
                 count=1, payload=geometry.full_block(block) if payload is None else payload)


def layer_frame(geometry: Geometry, blocks: list[Block], layer: int, request: int,
                fulls: dict[int, bytes] | None = None) -> Frame:
    """One layer of consecutive `blocks`, cut from their Full Blocks when given."""
    parts = []
    for block_id, tokens in blocks:
        if fulls is not None:
            parts.append(geometry.layer_of(fulls[block_id], tokens, layer))
        else:
            parts.append(kv_bytes(block_id, layer, geometry.layer_block_bytes(tokens)))
    return Frame(MessageType.LAYER_DATA, request=request, layer=layer,
                 block=blocks[0][0] if blocks else 0, count=len(blocks), payload=b"".join(parts))


class Verifier:
    """Counts verified and corrupt KV; corrupt bytes are never accepted."""

    def __init__(self) -> None:
        self.verified_bytes = 0
        self.verified_blocks = 0
        self.corrupt_bytes = 0

    def full_block(self, geometry: Geometry, block: Block, payload: bytes) -> None:
        if len(payload) != geometry.full_block_bytes(block[1]) or \
                payload != geometry.full_block(block):
            self.corrupt_bytes += len(payload)
            raise ProtocolError(f"block {block[0]}: {len(payload)} bytes do not verify")
        self.verified_bytes += len(payload)
        self.verified_blocks += 1

    def layer(self, geometry: Geometry, blocks: list[Block], layer: int,
              payload: bytes) -> None:
        expected = layer_frame(geometry, blocks, layer, 0).payload
        if payload != expected:
            self.corrupt_bytes += len(payload)
            raise ProtocolError(f"layer {layer} of {len(blocks)} blocks from {blocks[:1]}: "
                                f"{len(payload)} bytes do not verify")
        self.verified_bytes += len(payload)
        self.verified_blocks += len(blocks)

    def stats(self) -> dict:
        return dict(verified_bytes=self.verified_bytes, verified_blocks=self.verified_blocks,
                    corrupt_bytes=self.corrupt_bytes)


def placement(block_id: int, storage_hosts: list[str], replicas: int) -> list[str]:
    """The storage hosts holding `block_id`: striped by id, replicas on the next hosts."""
    first = block_id % len(storage_hosts)
    count = min(replicas, len(storage_hosts))
    return [storage_hosts[(first + i) % len(storage_hosts)] for i in range(count)]
