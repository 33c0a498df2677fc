"""GEMV from GGUF Q4_1 / Q8_0 blocks: the C++ kernel against the reference's arithmetic, the reference's
dequantization against the gguf library's on the shipped model, and the product against float32."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from kernels.gguf import BLOCK_BYTES, GGUFMatrix, gguf_gemv

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")


TYPES = ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"]
K_QUANTS = ("Q4_K", "Q6_K")                 # rows of whole 256-weight super-blocks


def cases(shapes: list[tuple[int, ...]]) -> list[tuple]:
    """(block_type, *shape) for every type and shape its rows can hold (a shape's last number is K)."""
    return [(t, *shape) for t in TYPES for shape in shapes if t not in K_QUANTS or shape[-1] % 256 == 0]


def random_blocks(n: int, k: int, block_type: str, seed: int) -> torch.Tensor:
    """Valid random blocks: small positive fp16 scales (Q4_1 offsets negative, as real weights have); Q4_K
    super-blocks with random scales (Q4_K: 6-bit scales and mins; Q6_K: int8 scales; K whole super-blocks)."""
    g = torch.Generator().manual_seed(seed)
    if block_type in K_QUANTS:
        size = 144 if block_type == "Q4_K" else 210
        raw = torch.randint(0, 256, (n, k // 256, size), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, k // 256, 2, generator=g) * 0.002 + 1e-4).half()
        if block_type == "Q4_K":
            raw[..., 0:4] = scales.view(torch.uint8).view(n, k // 256, 4)
        else:
            raw[..., 208:210] = scales[..., :1].view(torch.uint8).view(n, k // 256, 2)
        return raw.reshape(n, -1)
    nb = k // 32
    raw = torch.randint(0, 256, (n, nb, BLOCK_BYTES[block_type]), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, nb, generator=g) * 0.02 + 1e-3).half()
    raw[..., 0:2] = d.view(torch.uint8).view(n, nb, 2)
    if block_type == "Q4_1":
        m = (-torch.rand(n, nb, generator=g) * 0.1).half()
        raw[..., 2:4] = m.view(torch.uint8).view(n, nb, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16, 37, 128])    # row groups of 8, remainders, prefill chunks
@pytest.mark.parametrize("block_type,n,k", cases([(1, 32), (7, 64), (960, 576), (576, 1536), (130, 96), (33, 256),
                                                  (40, 288)]))
# channel tails; groups of 8 blocks: shorter than one, whole, and short last groups
def test_matches_the_reference_arithmetic(block_type, m, n, k):
    blocks = random_blocks(n, k, block_type, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0.0                                                   # an all-zero activation block
    y = gguf_gemv(x, blocks, block_type)
    # float32 accumulation over up to 1,536 products against float64: outputs are O(1)
    torch.testing.assert_close(y, reference.gguf_gemv(x, blocks, block_type, k), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_type,n,k", cases([(300, 576), (301, 96), (33, 320), (35, 640), (7, 160), (64, 1536),
                                                  (33, 512)]))
# groups of 8 blocks: whole ones with a short packed last one (2 or 4 blocks), a short masked one (3, 5),
# whole ones only; odd channel counts (a tile's last channel alone)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(block_type, n, k):
    """Bit for bit: a decode row alone equals the same row among others (a batch, a prefill chunk, or the
    k + 1 rows of a speculative verification), so greedy speculation reproduces plain decoding's tokens.
    Above 8 rows an AVX512-VNNI CPU multiplies in tiles of channels x rows (512-bit products) instead of
    the decode path's passes of 8 rows; the counts here cover every tile remainder and several panels."""
    blocks = random_blocks(n, k, block_type, seed=11)
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(12))
    x[5, :32] = 0.0
    x[6] = -x[6].abs()
    alone = torch.cat([gguf_gemv(x[i:i + 1], blocks, block_type) for i in range(300)])
    for m in (2, 3, 5, 8, 9, 10, 11, 16, 40, 129, 300):
        assert torch.equal(gguf_gemv(x[:m], blocks, block_type), alone[:m]), m


@pytest.mark.parametrize("block_type", TYPES)
def test_the_product_is_close_to_float32_over_the_dequantized_weights(block_type):
    """Activation quantization per 32-value block costs well under 1% of the output's scale."""
    k = 768 if block_type in K_QUANTS else 576
    blocks = random_blocks(512, k, block_type, seed=3)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(4))
    exact = x @ reference.gguf_dequantize(blocks, block_type, k).T
    err = (gguf_gemv(x, blocks, block_type) - exact).abs().max() / exact.abs().max()
    assert err < 0.01, float(err)


def test_dequantization_equals_the_gguf_library_on_the_shipped_model(gguf_file):
    from gguf.quants import dequantize

    for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        t = gguf_file.raw_tensor(name)
        block_type = gguf_file.tensor_type(name)
        raw = torch.from_numpy(np.array(t.data, copy=True))
        k = int(t.shape[0])
        ours = GGUFMatrix(raw, block_type, k).dequantize()
        theirs = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(ours.shape))
        assert torch.equal(ours, theirs), name


def test_the_reference_path_can_be_forced(monkeypatch):
    blocks = random_blocks(64, 128, "Q4_1", seed=5)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    fast = gguf_gemv(x, blocks, "Q4_1")
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    torch.testing.assert_close(gguf_gemv(x, blocks, "Q4_1"), fast, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    blocks = random_blocks(8, 64, "Q4_1", seed=1)
    with pytest.raises(ValueError, match="block_type"):
        GGUFMatrix(blocks, "Q5_K", 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        GGUFMatrix(blocks, "Q4_1", 48)
    with pytest.raises(ValueError, match="uint8"):
        GGUFMatrix(blocks, "Q8_0", 64)
    with pytest.raises(ValueError, match="float32"):
        GGUFMatrix(blocks, "Q4_1", 64)(torch.zeros(1, 32))


def _runs_at(level: str) -> bool:
    """Whether this CPU runs `level` when capped at it (avxvnni needs AVX-VNNI itself, which some AVX512-VNNI
    CPUs lack: they run avx2 then)."""
    best = kernels.set_cpu_isa(level)
    try:
        return kernels.cpu_isa() == level
    finally:
        kernels.set_cpu_isa(best)


LEVELS = [lvl for lvl in kernels.ISA_LEVELS if _runs_at(lvl)]


@pytest.fixture
def isa():
    """Runs the body at a chosen instruction-set level, then restores the best one."""
    best = kernels.cpu_isa()
    yield kernels.set_cpu_isa
    kernels.set_cpu_isa(best)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m", [1, 5, 8, 9])
@pytest.mark.parametrize("block_type,n,k", cases([(70, 576), (40, 288), (33, 256), (9, 64), (21, 512)]))
def test_every_instruction_set_level_matches_the_reference(isa, level, block_type, m, n, k):
    isa(level)
    assert kernels.cpu_isa() == level
    blocks = random_blocks(n, k, block_type, seed=n * k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 1)) * 3
    torch.testing.assert_close(gguf_gemv(x, blocks, block_type), reference.gguf_gemv(x, blocks, block_type, k),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(len([lvl for lvl in LEVELS if lvl != "scalar"]) < 2, reason="this CPU has one SIMD level")
@pytest.mark.parametrize("block_type,k", cases([(576,), (1536,), (96,), (512,)]))
@pytest.mark.parametrize("m", [3, 9])
def test_the_simd_levels_give_the_same_bits(isa, block_type, k, m):
    """The SIMD levels (AVX2, AVX-VNNI, AVX512-VNNI) compute the same exact integer block sums and then the same
    float operations, so a model's greedy output does not depend on which one a machine has."""
    blocks = random_blocks(257, k, block_type, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + 1)) * 4
    x[1, 64:96] = 0.0
    x[2, :] = -x[2, :].abs()            # all-negative rows: the unsigned codes' bias at its largest
    results = {}
    for level in LEVELS[1:]:
        isa(level)
        results[level] = gguf_gemv(x, blocks, block_type)
    first = results.pop(LEVELS[1])
    for level, y in results.items():
        assert torch.equal(y, first), (level, LEVELS[1])


def test_unknown_instruction_set_levels_are_refused(isa):
    with pytest.raises(ValueError, match="avx2"):
        isa("sse9")


def test_the_level_can_be_capped_from_the_environment():
    code = "import kernels; print(kernels.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "STRATA_CPU_ISA": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "STRATA_CPU_ISA": "fast"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "STRATA_CPU_ISA must be one of" in bad.stderr


# whole groups with a short packed one, a short packed one alone, a masked one, whole super-blocks
@pytest.mark.parametrize("block_type,k", cases([(576,), (96,), (320,), (512,)]))
def test_rows_dequantize_as_the_whole_matrix_does(block_type, k, monkeypatch):
    """An embedding lookup from the blocks (GGUFMatrix.dequantize_rows: the C++ kernel, or torch ops where
    the kernels are off) gives exactly ggml's rows; a row id outside the table is an IndexError."""
    matrix = GGUFMatrix(random_blocks(50, k, block_type, seed=k), block_type, k)
    ids = torch.tensor([0, 49, 7, 7, 23])
    expected = matrix.dequantize()[ids]
    assert torch.equal(matrix.dequantize_rows(ids), expected)
    assert matrix.dequantize_rows(ids[:0]).shape == (0, k)
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        matrix.dequantize_rows(torch.tensor([3, 50]))
    monkeypatch.setenv("STRATA_KERNELS", "reference")
    assert torch.equal(matrix.dequantize_rows(ids), expected)
