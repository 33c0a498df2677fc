"""Layer groups of the KV pool (engine/kv_layout.py) and the KV cache manager over them: local groups give
back the blocks their window has left, through every way a request's blocks change."""

from __future__ import annotations

from types import SimpleNamespace

from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.kv_layout import KVLayout
from services.inference.engine.request import Request
from services.inference.sampling import SamplingParams

GEMMA3_270M = SimpleNamespace(num_layers=18, sliding_window=512,
                              sliding_layers=tuple(bool((i + 1) % 6) for i in range(18)))


def test_a_model_without_local_layers_is_one_group_of_every_layer():
    layout = KVLayout.for_model(SimpleNamespace(num_layers=30))
    assert layout.groups == (tuple(range(30)),) and layout.windows == (0,) and not layout.hybrid
    assert layout.num_tensors == 30 and layout.tensor_of(7) == 7


def test_gemma3_270m_is_one_global_group_and_five_local_groups_of_three():
    layout = KVLayout.for_model(GEMMA3_270M)
    assert layout.groups[0] == (5, 11, 17) and layout.windows == (0, 512, 512, 512, 512, 512)
    assert layout.groups[1] == (0, 1, 2) and layout.num_tensors == 3
    assert (layout.group_of(11), layout.tensor_of(11), layout.group_of(4), layout.tensor_of(4)) == (0, 1, 2, 1)


def test_an_8k_request_of_gemma3_holds_a_fifth_of_full_attentions_blocks():
    """In blocks of 16 positions, each 3 layers deep (96 KiB in float32: 1 KV head of 256): 8,192 positions at
    full attention take 6 x 512 blocks (288 MiB); with the local groups holding their window (512 positions
    over at most 33 blocks), 512 + 5 x 33 = 677 decoding (63 MiB), and 512 + 5 x 161 while a 2,048-token
    chunk is computed."""
    layout = KVLayout.for_model(GEMMA3_270M)
    assert layout.blocks_for(8192, 16, 1) == 512 + 5 * 33
    assert layout.blocks_for(8192, 16, 2048) == 512 + 5 * 161
    assert layout.blocks_for(100, 16, 100) == 6 * 7               # shorter than the window: every block


def request(n: int) -> Request:
    return Request("r", list(range(n)), SamplingParams(temperature=0), max_tokens=64)


def step(kv: KVCacheManager, req: Request, n: int) -> None:
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens += n


def test_local_tables_release_what_left_the_window_and_free_everything_at_the_end():
    layout = KVLayout(((0,), (1,)), (0, 8))               # one global layer, one local over 8 positions
    kv = KVCacheManager(40, 4, layout=layout, max_chunk_tokens=4)
    assert not kv.enable_prefix_caching and kv.num_blocks == 40 and kv.num_free_blocks == 40
    req = request(40)
    for _ in range(10):                                    # 40 positions in chunks of 4
        step(kv, req, 4)
    assert len(req.block_tables[0]) == 10 and len(req.block_tables[1]) == 10
    live = [b for b in req.block_tables[1] if b != kv.null_block]
    # the next token (position 40) reads 33..40: blocks 8 and 9 live, 0..7 released
    assert kv.allocate_slots(req, 1)
    live = [b for b in req.block_tables[1] if b != kv.null_block]
    assert req.block_tables[1][:8] == [kv.null_block] * 8 and len(live) == 3          # 8, 9 and the new 10
    assert kv.num_free_blocks == 40 - 11 - 3
    kv.trim(req, 40)                                       # a rejected proposal's block goes back
    assert len(req.block_tables[0]) == len(req.block_tables[1]) == 10 and kv.num_free_blocks == 40 - 10 - 2
    kv.free(req)
    assert kv.num_free_blocks == 40 and req.block_tables == [[], []]


def test_the_longest_request_counts_the_local_groups_window_only():
    layout = KVLayout(((0,), (1,)), (0, 8))
    kv = KVCacheManager(40, 4, layout=layout, max_chunk_tokens=4)
    # 40 blocks: n/4 global + min(n/4, (8 - 1 + 4)/4 + 1 = 4) local
    assert kv.max_request_tokens == 36 * 4
    assert KVCacheManager(40, 4).max_request_tokens == 160
