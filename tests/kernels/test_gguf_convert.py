"""The GGUF types the GEMV kernels multiply besides Q4_1 and Q8_0: Q5_0, Q4_K and Q6_K as stored (their own
blocks, the file's bytes), checked against the gguf library's dequantization of random blocks and of the
Gemma 3 file's own tensors, and the kernel's product against gguf's dequantize + matmul; and the Q8_0 a fused
projection of mixed types is rewritten into (kernels/gguf_convert.py), within its stated bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

import kernels
from kernels import GGUFMatrix
from kernels.gguf_convert import convert
from services.inference.models import catalog

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")
BYTES = {"Q4_1": (32, 20), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}   # weights, bytes a block
GEMMA = catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf"


def random_blocks(n: int, k: int, kind: str, seed: int) -> np.ndarray:
    """Random codes and sub-block scales with small positive fp16 super-scales (a K-quant's d and dmin, Q5_0's
    d; Q6_K keeps its d last)."""
    rng = np.random.default_rng(seed)
    per, size = BYTES[kind]
    raw = rng.integers(0, 256, (n * k // per, size), dtype=np.uint8)
    scales = (rng.random((raw.shape[0], 2)) * 0.02 + 1e-3).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[:, -2:] = scales[:, :2]
    else:
        raw[:, :2] = scales[:, :2]
        if kind in ("Q4_K", "Q4_1"):                       # dmin, Q4_1's offset m
            raw[:, 2:4] = scales[:, 2:4]
    return raw.reshape(n, -1)


def largest_per_32(w: np.ndarray) -> np.ndarray:
    return np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["Q5_0", "Q4_K", "Q6_K"])
def test_the_kernels_blocks_are_the_files_and_dequantize_as_gguf(kind):
    """Regrouped for the kernel and back: the file's bytes again; dequantized: gguf's weights exactly."""
    n, k = 24, 512
    raw = random_blocks(n, k, kind, seed=len(kind))
    blocks, kernel_type = convert(raw, kind, k)
    assert kernel_type == kind and blocks is not None
    matrix = GGUFMatrix(torch.from_numpy(blocks.copy()), kernel_type, k)
    assert torch.equal(matrix.blocks(), torch.from_numpy(raw))
    want = dequantize(raw, GGMLQuantizationType[kind]).reshape(n, k)
    assert np.array_equal(matrix.dequantize().numpy(), want)
    assert matrix.nbytes <= raw.nbytes * 1.03            # Q4_K's unpacked 6-bit fields: 148 bytes a 144


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K", "Q6_K"])
def test_a_fused_projection_of_mixed_types_is_rewritten_into_q8_0_within_its_bound(kind):
    """Re-rounded onto 8 bits over each 32 (half a step of max / 127), the scale to fp16."""
    n, k = 24, 512
    raw = random_blocks(n, k, kind, seed=3)
    want = dequantize(raw, GGMLQuantizationType[kind]).reshape(n, k)
    blocks, kernel_type = convert(raw, kind, k, to="Q8_0")
    got = GGUFMatrix(torch.from_numpy(blocks.copy()), kernel_type, k).dequantize().numpy()
    err = np.abs(got - want).reshape(-1, 32)
    assert kernel_type == "Q8_0"
    assert (err <= largest_per_32(want) * (0.5 + 127 * 2.0 ** -11) / 127 * 1.01 + 1e-7).all()


@pytest.mark.parametrize("m", [1, 3, 8, 17])
# whole groups of 8 blocks; for Q5_0 also a short masked last one (3 blocks: K-quant rows are whole super-blocks)
@pytest.mark.parametrize("kind,k", [("Q5_0", 768), ("Q5_0", 608), ("Q4_K", 768), ("Q6_K", 768)])
def test_the_kernel_multiplies_converted_blocks_as_gguf_dequantize_and_matmul(kind, m, k):
    """Within the kernels' int8 activation error plus the conversion's: 5% of the output's spread (these
    random blocks' sub-block scales vary far more than real weights'; measured up to 2.2%)."""
    n = 64
    raw = random_blocks(n, k, kind, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = x @ torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(n, k)).T
    blocks, kernel_type = convert(raw, kind, k)
    got = GGUFMatrix(torch.from_numpy(blocks.copy()), kernel_type, k)(x)
    assert float((got - want).abs().max()) <= 0.05 * float(want.std())


@pytest.fixture(scope="module")
def gemma_file():
    """The real file, opened once (its header holds 262k tokens: seconds to read)."""
    if not GEMMA.is_file():
        pytest.fail(f"{GEMMA} missing: `make install` assembles it")
    from services.inference.models.gguf_file import GGUFFile
    return GGUFFile(GEMMA)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.3.ffn_down.weight",
                                  "blk.17.ffn_up.weight"])
def test_the_gemma3_files_tensors(name, gemma_file):
    """Q5_0, Q4_K, Q6_K and Q5_0 tensors of the real file: multiplied as stored, gguf's weights exactly."""
    t = gemma_file.raw_tensor(name)
    k = int(t.shape[0])
    want = dequantize(t.data, t.tensor_type).reshape(-1, k)
    blocks, kernel_type = convert(np.asarray(t.data), t.tensor_type.name, k)
    got = GGUFMatrix(torch.from_numpy(blocks.copy()), kernel_type, k).dequantize().numpy()
    err = float(np.abs(got - want).max()) / float(np.abs(want).max())
    assert err == 0.0, err


def test_q5_0_fused_with_q8_0_is_widened_exactly():
    """A fused projection needs one block type: Gemma 3's Q|K (Q5_0) join V (Q8_0) as Q8_0, the same weights;
    a projection of one type keeps its own blocks; mixed kernel types meet in Q8_0; others stay dense."""
    from kernels.gguf_convert import fused_kernel_type

    raw = random_blocks(24, 512, "Q5_0", seed=9)
    blocks, kernel_type = convert(raw, "Q5_0", 512, to="Q8_0")
    got = GGUFMatrix(torch.from_numpy(blocks.copy()), kernel_type, 512).dequantize().numpy()
    assert kernel_type == "Q8_0" and np.array_equal(got, dequantize(raw, GGMLQuantizationType.Q5_0).reshape(24, 512))
    assert fused_kernel_type(["Q5_0", "Q5_0", "Q8_0"]) == "Q8_0"
    assert fused_kernel_type(["Q5_0", "Q5_0"]) == "Q5_0" and fused_kernel_type(["Q4_K"]) == "Q4_K"
    assert fused_kernel_type(["Q6_K"]) == "Q6_K" and fused_kernel_type(["Q4_K", "Q4_K", "Q6_K"]) == "Q8_0"
    assert fused_kernel_type(["F32", "Q8_0"]) is None and fused_kernel_type(["Q5_K"]) is None
    with pytest.raises(ValueError, match="cannot be converted"):
        convert(raw, "Q5_0", 512, to="Q4_1")
