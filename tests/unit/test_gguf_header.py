"""Strata's GGUF header reader (services/inference/models/gguf_file.py) against the `gguf` package's
GGUFReader: every metadata value and every tensor (type, shape, sizes, offset, the bytes themselves) equal
on SmolLM2's file, Gemma 3's and a file written here with every value type; a damaged file is a ValueError
that names it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from services.inference.models import catalog
from services.inference.models.gguf_file import GGUFFile, default_model_path

GEMMA = catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf"


def assert_same_as_gguf(path) -> None:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]      # gguf's pseudo-fields of the header
    assert sorted(ours._fields) == sorted(keys)
    for key in keys:
        assert ours.field(key) == theirs.fields[key].contents(), key
    assert ours.tensor_names() == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.raw_tensor(t.name)
        assert (mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == \
            (t.tensor_type, t.n_elements, t.n_bytes, t.data_offset), t.name
        assert mine.shape.tolist() == t.shape.tolist() and mine.data.dtype == t.data.dtype, t.name
        assert mine.data.shape == t.data.shape and np.array_equal(mine.data, t.data), t.name


@pytest.fixture(scope="module")
def every_value_type(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ 👋")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ü", "\n"])
    w.add_array("t.empty", [])
    w.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("f16", np.ones((2, 64), dtype=np.float16))
    w.add_tensor("q8", gguf.quants.quantize(np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(3, 64),
                                            gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_file_with_every_value_type_reads_as_gguf_reads_it(every_value_type):
    assert_same_as_gguf(every_value_type)
    f = GGUFFile(every_value_type)
    assert f.field("t.str") == "héllo ✓ 👋" and f.field("t.u64") == 2**63 + 5 and f.field("t.bool") is True
    assert f.field("t.missing", "default") == "default"
    assert f.dequantize("f32").tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def test_smollm2_reads_as_gguf_reads_it():
    assert_same_as_gguf(default_model_path())


def test_gemma3_reads_as_gguf_reads_it():
    if not GEMMA.is_file():
        pytest.fail(f"{GEMMA} missing: `make install` assembles it")
    assert_same_as_gguf(GEMMA)


@pytest.mark.parametrize("damage", ["magic", "version", "truncated header", "truncated data"])
def test_a_damaged_file_is_a_value_error_naming_it(every_value_type, tmp_path, damage):
    data = bytearray(every_value_type.read_bytes())
    if damage == "magic":
        data[:4] = b"GGML"
    elif damage == "version":
        data[4:8] = (1).to_bytes(4, "little")
    elif damage == "truncated header":
        data = data[:100]
    else:
        data = data[:-60]                 # into the last tensor, past its alignment padding
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.gguf"):
        GGUFFile(path)
