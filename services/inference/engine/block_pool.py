"""KV blocks: ref counts, an LRU free list and the prefix-cache index of full blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, NewType, Sequence

BlockHash = NewType("BlockHash", bytes)


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Chained hash of a full block: (parent hash, block token ids, extra keys)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(array("i", token_ids).tobytes())
    h.update(extra)
    return BlockHash(h.digest())


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None          # set once the block is full and registered
    token_ids: tuple[int, ...] | None = None     # kept to re-check a prefix hit


class BlockPool:
    """Owns every block. Free blocks sit in LRU order; a freed full block stays findable by its
    hash until it is handed out again (that is when its cache entry is evicted)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """A cached block with this hash whose tokens really match, else None."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != tuple(token_ids):
            return None
        return block_id

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on already-filled blocks (prefix hits)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                # evict from the prefix cache
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
                block.token_ids = None
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each; pass a sequence's blocks tail-first so its prefix is evicted last."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Make a full block findable by its hash (first writer wins)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self._cached.items()):
            self.blocks[block_id].block_hash = None
            self.blocks[block_id].token_ids = None
        self._cached.clear()
