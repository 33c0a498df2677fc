"""Generate the Python gRPC stubs from protos/ into services/common/stubs (never edited by hand).

Run by `make protos` (and so by `make install`). protoc writes `from strata.v1 import x_pb2`; the
imports are rewritten to the package path so the stubs need nothing on sys.path.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "stubs"
PACKAGE = "services.common.stubs"


def generate() -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in OUT_DIR.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from strata\.v1 import", f"from {PACKAGE}.strata.v1 import", text, flags=re.M)
        fixed = re.sub(r"^import strata\.v1\.", f"import {PACKAGE}.strata.v1.", fixed, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    for d in [OUT_DIR, *[p for p in OUT_DIR.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        (d / "__init__.py").touch()
    return written


if __name__ == "__main__":
    files = generate()
    print(f"generated {len(files)} stub files in {OUT_DIR.relative_to(ROOT)}", file=sys.stderr)
