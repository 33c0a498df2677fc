"""Block tables per request on top of the block pool, with prefix caching of full blocks.

The layers' groups (engine/kv_layout.py) each hold one table per request. Entries of a sliding-window
group's table that its window has left point at the null block (reserved, never written, always masked
out) once their blocks have gone back to the pool. Prefix caching needs every group's blocks of a prefix
and a local group frees them, so it is off for models with such layers."""

from __future__ import annotations

import logging

from services.inference.engine.block_pool import BlockPool, hash_block
from services.inference.engine.kv_layout import KVLayout
from services.inference.engine.request import Request

log = logging.getLogger(__name__)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 layout: KVLayout | None = None, max_chunk_tokens: int | None = None) -> None:
        """`layout`: the model's layer groups (default: one group); `max_chunk_tokens`: the most tokens a
        request computes in one step (the scheduler's budget), which bounds a local group's live blocks."""
        self.block_size = block_size
        self.layout = layout or KVLayout(((0,),), (0,))
        self.windows = self.layout.windows
        self.max_chunk_tokens = max_chunk_tokens
        if self.layout.hybrid and enable_prefix_caching:
            log.info("prefix caching off: sliding-window layers free their blocks")
            enable_prefix_caching = False
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks + (1 if self.layout.hybrid else 0))
        # a local group's table entries the window has left: a block never handed out
        self.null_block = self.pool.allocate(1)[0] if self.layout.hybrid else None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        """Blocks requests can hold (the null block aside)."""
        return self.pool.num_blocks - (self.null_block is not None)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def max_request_tokens(self) -> int:
        """The longest request (prompt + output) whose blocks fit in the pool alone."""
        whole = self.num_blocks * self.block_size // len(self.windows)
        if not self.layout.hybrid:
            return whole
        chunk = self.max_chunk_tokens or whole
        lo, hi = whole, self.num_blocks * self.block_size          # blocks_for grows with the tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.layout.blocks_for(mid, self.block_size, min(chunk, mid)) <= self.num_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _update_hashes(self, req: Request, num_tokens: int) -> None:
        """Extend req.block_hashes over every full block within its first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(req.block_hashes), num_tokens // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block(parent, req.all_token_ids[i * bs:(i + 1) * bs]))

    # prefix cache
    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks matching the request's leading full blocks. At least the last token is left
        to compute, so the step that finishes the prompt produces logits."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        self._update_hashes(req, max_blocks * bs)
        hits = []
        for i in range(max_blocks):
            block_id = self.pool.lookup(req.block_hashes[i], req.all_token_ids[i * bs:(i + 1) * bs])
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # allocation
    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Reserve room for num_new_tokens more tokens (after any prefix hits). False if blocks run out;
        nothing changes then but the release of blocks a local group's window has left (never read again).
        On success, full blocks are registered in the prefix cache."""
        computed_blocks = computed_blocks or []
        if len(req.block_tables) != len(self.windows):
            req.block_tables = [req.block_ids] + [[] for _ in self.windows[1:]]
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        if self.layout.hybrid:
            self._release_out_of_window(req, num_computed)
        total = num_computed + num_new_tokens
        want = cdiv(total, self.block_size)
        needed = [want - len(table) - (len(computed_blocks) if g == 0 else 0)
                  for g, table in enumerate(req.block_tables)]
        num_needed = sum(n for n in needed if n > 0)
        # hits that sit in the free list are taken out of it too
        num_evictable_hits = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_needed + num_evictable_hits > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            req.block_ids.extend(computed_blocks)
        for table, n in zip(req.block_tables, needed):
            if n > 0:
                table.extend(self.pool.allocate(n))
        if self.enable_prefix_caching:       # verified tokens only: proposals may be rejected
            self._cache_full_blocks(req, min(total, req.num_tokens))
        return True

    def _release_out_of_window(self, req: Request, num_computed: int) -> None:
        """In each local group, the blocks before the window of position `num_computed` (the next token to
        compute) hold positions no later token reads: back to the pool, their entries the null block."""
        if len(req.num_released_blocks) != len(self.windows):
            req.num_released_blocks = [0] * len(self.windows)
        for g, window in enumerate(self.windows):
            if not window:
                continue
            table, start = req.block_tables[g], req.num_released_blocks[g]
            dead = min(len(table), max(0, (num_computed - window + 1) // self.block_size))
            if dead > start:
                self.pool.free(b for b in reversed(table[start:dead]) if b != self.null_block)
                table[start:dead] = [self.null_block] * (dead - start)
                req.num_released_blocks[g] = dead

    def trim(self, req: Request, num_tokens: int) -> None:
        """Release blocks past the first num_tokens positions (slots of rejected speculative tokens)."""
        keep = cdiv(num_tokens, self.block_size)
        for table in req.block_tables:
            if len(table) > keep:
                self.pool.free(b for b in reversed(table[keep:]) if b != self.null_block)
                del table[keep:]
        req.num_registered_blocks = min(req.num_registered_blocks, keep)

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        bs = self.block_size
        self._update_hashes(req, num_tokens)
        for i in range(req.num_registered_blocks, num_tokens // bs):
            self.pool.register(req.block_ids[i], req.block_hashes[i], req.all_token_ids[i * bs:(i + 1) * bs])
        req.num_registered_blocks = max(req.num_registered_blocks, num_tokens // bs)

    def free(self, req: Request) -> None:
        for table in req.block_tables:
            self.pool.free(b for b in reversed(table) if b != self.null_block)
        req.block_tables = [[] for _ in req.block_tables]
        req.num_released_blocks = []
        req.num_registered_blocks = 0
