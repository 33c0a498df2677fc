"""Int8Linear: the int8 (_int_mm) and the float32-emulated products give the same numbers."""

import torch

from services.inference.models.linear import DenseLinear, Int8Linear, int8_matmul_is_fast


def test_int8_emulation_matches_int_mm_and_stays_close_to_dense() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(576, 1536, generator=g)
    x = torch.randn(5, 3, 576, generator=g)
    real, emulated = Int8Linear(w, emulate=False), Int8Linear(w, emulate=True)
    y_real, y_emulated = real(x), emulated(x)
    assert y_real.shape == (5, 3, 1536)
    torch.testing.assert_close(y_emulated, y_real, rtol=1e-5, atol=1e-4)
    dense = DenseLinear(w)(x)
    rel = (y_real - dense).norm() / dense.norm()
    assert 0 < rel < 0.02, rel   # quantization error: present, and small


def test_int8_speed_probe_answers_a_bool() -> None:
    assert isinstance(int8_matmul_is_fast(), bool)
