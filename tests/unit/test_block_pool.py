"""Specification of KV block bookkeeping: the block pool (ref counts, LRU free list, prefix-cache
index), the chained block hash, and the per-request block tables of the KV cache manager."""

from __future__ import annotations

import pytest

from services.inference.engine.block_pool import BlockHash, BlockPool, hash_block
from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.request import Request
from services.inference.sampling import SamplingParams

BLOCK_SIZE = 16


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, prompt_token_ids, SamplingParams(temperature=0), max_tokens=max_tokens)


def compute(kv: KVCacheManager, req: Request, num_new_tokens: int | None = None) -> None:
    """Take prefix hits, reserve slots for the rest (or num_new_tokens) and mark it all computed,
    in the scheduler's order: hits count as computed only after allocate_slots succeeds."""
    computed = kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
    num_hit = len(computed) * kv.block_size
    if num_new_tokens is None:
        num_new_tokens = req.num_tokens - req.num_computed_tokens - num_hit
    assert kv.allocate_slots(req, num_new_tokens, computed)
    req.num_computed_tokens += num_hit + num_new_tokens


def filled_pool(num_blocks: int) -> tuple[BlockPool, list[int]]:
    pool = BlockPool(num_blocks)
    return pool, pool.allocate(num_blocks)


# hash_block

def test_hash_block_is_deterministic():
    assert hash_block(None, [1, 2, 3]) == hash_block(None, [1, 2, 3])


def test_hash_block_is_chained_on_the_parent_hash():
    parent_a = hash_block(None, [1, 2, 3])
    parent_b = hash_block(None, [4, 5, 6])
    assert hash_block(parent_a, [7, 8, 9]) != hash_block(parent_b, [7, 8, 9])
    assert hash_block(parent_a, [7, 8, 9]) != hash_block(None, [7, 8, 9])


def test_hash_block_depends_on_token_order_and_extra_keys():
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [1, 2], b"lora-a") != hash_block(None, [1, 2])


# BlockPool: allocation and the LRU free list

def test_pool_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_fresh_pool_hands_out_blocks_in_id_order_with_one_reference():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert [pool.blocks[b].ref_cnt for b in range(4)] == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)


def test_allocate_takes_the_least_recently_freed_block_first():
    pool, _ = filled_pool(4)
    pool.free([2])
    pool.free([0])
    pool.free([3])
    assert pool.allocate(3) == [2, 0, 3]


def test_allocating_more_than_is_free_raises_and_takes_nothing():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_shared_block_returns_to_the_free_list_only_when_its_last_reference_goes():
    pool = BlockPool(2)
    [block_id] = pool.allocate(1)
    pool.touch([block_id])
    assert pool.blocks[block_id].ref_cnt == 2
    pool.free([block_id])
    assert pool.blocks[block_id].ref_cnt == 1
    assert pool.num_free_blocks == 1
    pool.free([block_id])
    assert pool.blocks[block_id].ref_cnt == 0
    assert pool.num_free_blocks == 2


def test_double_free_raises():
    pool = BlockPool(2)
    [block_id] = pool.allocate(1)
    pool.free([block_id])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block_id])


# BlockPool: prefix-cache index

def test_freed_full_block_stays_findable_by_hash_until_it_is_reallocated():
    pool = BlockPool(1)
    [block_id] = pool.allocate(1)
    h = hash_block(None, [1, 2])
    pool.register(block_id, h, [1, 2])
    pool.free([block_id])
    assert pool.lookup(h, [1, 2]) == block_id

    assert pool.allocate(1) == [block_id]   # handed out again: evicted from the prefix cache
    assert pool.lookup(h, [1, 2]) is None
    assert pool.blocks[block_id].block_hash is None
    assert pool.blocks[block_id].token_ids is None


def test_lookup_misses_for_an_unknown_hash():
    pool = BlockPool(1)
    assert pool.lookup(hash_block(None, [1, 2]), [1, 2]) is None


def test_lookup_rechecks_tokens_so_a_hash_collision_is_a_miss():
    pool = BlockPool(1)
    [block_id] = pool.allocate(1)
    forced = BlockHash(b"\x01" * 16)
    pool.register(block_id, forced, [1, 2])
    assert pool.lookup(forced, [1, 2]) == block_id
    assert pool.lookup(forced, [3, 4]) is None


def test_touch_takes_a_free_cached_block_off_the_free_list():
    pool = BlockPool(3)
    [block_id] = pool.allocate(1)
    h = hash_block(None, [5, 6])
    pool.register(block_id, h, [5, 6])
    pool.free([block_id])
    assert pool.num_free_blocks == 3

    pool.touch([block_id])
    assert pool.num_free_blocks == 2
    assert pool.blocks[block_id].ref_cnt == 1
    assert block_id not in pool.allocate(2)
    assert pool.lookup(h, [5, 6]) == block_id   # still cached: it was never handed out again


def test_register_keeps_the_first_block_registered_under_a_hash():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    h = hash_block(None, [1, 2])
    pool.register(first, h, [1, 2])
    pool.register(second, h, [1, 2])
    assert pool.lookup(h, [1, 2]) == first


def test_evicting_a_duplicate_block_leaves_the_registered_one_findable():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    h = hash_block(None, [1, 2])
    pool.register(first, h, [1, 2])
    pool.register(second, h, [1, 2])
    pool.free([second])
    assert pool.allocate(1) == [second]
    assert pool.lookup(h, [1, 2]) == first


def test_reset_prefix_cache_forgets_every_hash():
    pool = BlockPool(2)
    [block_id] = pool.allocate(1)
    h = hash_block(None, [1, 2])
    pool.register(block_id, h, [1, 2])
    pool.reset_prefix_cache()
    assert pool.lookup(h, [1, 2]) is None
    assert pool.blocks[block_id].block_hash is None


# KVCacheManager: block tables

@pytest.mark.parametrize("num_tokens, num_blocks", [(1, 1), (16, 1), (17, 2), (32, 2), (33, 3)])
def test_allocate_slots_reserves_ceil_tokens_over_block_size_blocks(num_tokens, num_blocks):
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(num_tokens)))
    assert kv.allocate_slots(req, num_tokens)
    assert len(req.block_ids) == num_blocks
    assert kv.num_free_blocks == 8 - num_blocks


def test_allocate_slots_adds_a_block_only_when_a_decode_crosses_a_block_boundary():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(31)))
    compute(kv, req)
    assert len(req.block_ids) == 2
    req.append_token(100)                   # token 32 still fits in block 1
    compute(kv, req)
    assert len(req.block_ids) == 2
    req.append_token(101)                   # token 33 opens block 2
    compute(kv, req)
    assert len(req.block_ids) == 3


def test_allocate_slots_fails_without_side_effects_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(40)))
    assert not kv.allocate_slots(req, 40)
    assert req.block_ids == []
    assert req.num_registered_blocks == 0
    assert kv.num_free_blocks == 2
    assert all(block.block_hash is None for block in kv.pool.blocks)


def test_allocate_slots_counts_free_prefix_hits_against_the_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    first = make_request("first", list(range(8)))
    compute(kv, first)
    cached = list(first.block_ids)
    kv.free(first)                          # both blocks free but still cached
    second = make_request("second", list(range(8)) + [50, 51, 52, 53, 54])
    hits = kv.get_computed_blocks(second)
    assert hits == cached
    # 13 tokens need 4 blocks: 2 hits taken off the free list + 2 new > 3 free
    assert not kv.allocate_slots(second, 13 - 8, hits)
    assert second.block_ids == []
    assert kv.num_free_blocks == 3
    assert [kv.pool.blocks[b].ref_cnt for b in hits] == [0, 0]


def test_free_returns_every_block_of_the_request():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(40)))
    compute(kv, req)
    kv.free(req)
    assert req.block_ids == []
    assert kv.num_free_blocks == 8


def test_free_releases_the_tail_before_the_prefix_so_the_prefix_is_evicted_last():
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(48)))
    compute(kv, req)
    blocks = list(req.block_ids)
    kv.free(req)
    assert kv.pool.allocate(3) == blocks[::-1]


# KVCacheManager: prefix caching

@pytest.mark.parametrize("prompt_len, num_hit_blocks", [(15, 0), (16, 0), (17, 1), (32, 1), (33, 2), (40, 2)])
def test_prefix_hits_cover_only_full_blocks_and_never_the_last_prompt_token(prompt_len, num_hit_blocks):
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(kv, make_request("first", list(range(prompt_len))))
    second = make_request("second", list(range(prompt_len)))
    assert len(kv.get_computed_blocks(second)) == num_hit_blocks


def test_request_with_the_same_prefix_shares_the_cached_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("first", list(range(40)))
    compute(kv, first)
    second = make_request("second", list(range(40)) + [7, 7])
    compute(kv, second)
    assert len(second.block_ids) == 3
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]
    assert kv.num_free_blocks == 8 - 4
    assert [kv.pool.blocks[b].ref_cnt for b in first.block_ids[:2]] == [2, 2]
    assert kv.pool.blocks[first.block_ids[2]].ref_cnt == 1

    kv.free(first)
    assert [kv.pool.blocks[b].ref_cnt for b in second.block_ids[:2]] == [1, 1]
    kv.free(second)
    assert kv.num_free_blocks == 8


def test_prefix_hits_stop_at_the_first_block_that_differs():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("first", list(range(48)))
    compute(kv, first)
    changed_second_block = list(range(48))
    changed_second_block[20] = 999
    assert kv.get_computed_blocks(make_request("a", changed_second_block)) == first.block_ids[:1]


def test_prefix_hits_are_chained_so_a_matching_later_block_after_a_miss_does_not_hit():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(kv, make_request("first", list(range(48))))
    changed_first_block = list(range(48))
    changed_first_block[0] = 999
    assert kv.get_computed_blocks(make_request("b", changed_first_block)) == []


def test_freed_request_blocks_stay_hittable_until_reallocated():
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    first = make_request("first", list(range(33)))
    compute(kv, first)
    prefix_blocks = first.block_ids[:2]
    kv.free(first)
    second = make_request("second", list(range(33)))
    assert kv.get_computed_blocks(second) == prefix_blocks
    compute(kv, second)                     # the hits leave the free list; one new block for token 33
    assert second.block_ids[:2] == prefix_blocks
    assert kv.num_free_blocks == 1


def test_chunked_prefill_registers_each_block_once_it_is_full():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    req = make_request("r", list(range(48)))
    compute(kv, req, num_new_tokens=20)
    assert req.num_registered_blocks == 1
    compute(kv, req, num_new_tokens=28)
    assert req.num_registered_blocks == 3
    assert [kv.pool.blocks[b].block_hash for b in req.block_ids] == req.block_hashes


def test_with_prefix_caching_disabled_nothing_is_hit_or_registered():
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_request("first", list(range(40)))
    compute(kv, first)
    second = make_request("second", list(range(40)))
    assert kv.get_computed_blocks(second) == []
    compute(kv, second)
    assert set(first.block_ids).isdisjoint(second.block_ids)
    assert all(block.block_hash is None for block in kv.pool.blocks)
