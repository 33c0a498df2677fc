"""Block tables per request on top of the block pool, with prefix caching of full blocks."""

from __future__ import annotations

from services.inference.engine.block_pool import BlockPool, hash_block
from services.inference.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

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
        nothing changes then. On success, full blocks are registered in the prefix cache."""
        computed_blocks = computed_blocks or []
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = cdiv(total, self.block_size) - len(req.block_ids) - len(computed_blocks)
        # hits that sit in the free list are taken out of it too
        num_evictable_hits = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_needed + num_evictable_hits > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            req.block_ids.extend(computed_blocks)
        if num_needed > 0:
            req.block_ids.extend(self.pool.allocate(num_needed))
        if self.enable_prefix_caching:       # verified tokens only: proposals may be rejected
            self._cache_full_blocks(req, min(total, req.num_tokens))
        return True

    def trim(self, req: Request, num_tokens: int) -> None:
        """Release blocks past the first num_tokens positions (slots of rejected speculative tokens)."""
        keep = cdiv(num_tokens, self.block_size)
        if len(req.block_ids) > keep:
            self.pool.free(reversed(req.block_ids[keep:]))
            del req.block_ids[keep:]
            req.num_registered_blocks = min(req.num_registered_blocks, keep)

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        bs = self.block_size
        self._update_hashes(req, num_tokens)
        for i in range(req.num_registered_blocks, num_tokens // bs):
            self.pool.register(req.block_ids[i], req.block_hashes[i], req.all_token_ids[i * bs:(i + 1) * bs])
        req.num_registered_blocks = max(req.num_registered_blocks, num_tokens // bs)

    def free(self, req: Request) -> None:
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        req.num_registered_blocks = 0
