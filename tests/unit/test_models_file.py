"""The models file (services/common/models_file.py): deploy/models.toml is the suite `strata up` serves by
default, a file reads the same as TOML or YAML and round-trips through what `up` writes, and every mistake is
refused with where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import models_file
from services.common.models_file import DEFAULT_TIERS, ModelsFileError, TierSpec, parse
from services.up import DEFAULT_SUITE

ROOT = Path(__file__).resolve().parents[2]


def test_deploy_models_toml_is_the_default_suite():
    mf = models_file.load(ROOT / "deploy" / "models.toml")
    assert mf.models == DEFAULT_SUITE and dict(mf.tiers) == dict(DEFAULT_TIERS) and mf.default_tier == "standard"


def test_toml_and_yaml_read_alike_and_what_up_writes_reads_back(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('[[models]]\nname = "a"\nusd_per_1k_prompt_tokens = 0.5\nfallbacks = ["b"]\n'
                    '[[models]]\nname = "b"\nreplicas = 2\ntiers = ["premium"]\n'
                    '[[auto]]\nname = "code"\nmodel = "b"\nhas_code = true\n'
                    '[cascades.a]\nto = "b"\nmin_mean_logprob = -2\n'
                    '[splits.ab]\nweights = { a = 3, b = 1 }\nsticky = "conversation"\n'
                    '[embedding]\nname = "minilm"\nusd_per_1k_tokens = 0.001\ntiers = ["premium"]\n')
    yaml = tmp_path / "m.yaml"
    yaml.write_text("models:\n  - {name: a, usd_per_1k_prompt_tokens: 0.5, fallbacks: [b]}\n"
                    "  - {name: b, replicas: 2, tiers: [premium]}\n"
                    "auto: [{name: code, model: b, has_code: true}]\n"
                    "cascades: {a: {to: b, min_mean_logprob: -2}}\n"
                    "splits: {ab: {weights: {a: 3, b: 1}, sticky: conversation}}\n"
                    "embedding: {name: minilm, usd_per_1k_tokens: 0.001, tiers: [premium]}\n")
    a, b = models_file.load(toml), models_file.load(yaml)
    assert a == b and a.model("b").replicas == 2 and a.model("b").allows("premium") and not a.model("b").allows("free")
    assert a.cascades["a"].to == "b" and a.splits["ab"].weights == {"a": 3.0, "b": 1.0} and a.auto[0].has_code is True
    assert a.embedding.name == "minilm" and a.embedding.allows("premium") and not a.embedding.allows("free")
    models_file.dump(a, tmp_path / "written.yaml")
    assert models_file.load(tmp_path / "written.yaml") == a


@pytest.mark.parametrize("raw, message", [
    ({}, "names no model"),
    ({"models": [{"name": "a", "price": 1}]}, "unknown field(s) price"),
    ({"models": [{"name": "a"}], "extra": 1}, "unknown top-level key(s): extra"),
    ({"models": [{"name": "a"}, {"name": "a"}]}, "named twice"),
    ({"models": [{"name": "a", "fallbacks": ["a"]}]}, "falls back to itself"),
    ({"models": [{"name": "a", "fallbacks": ["zz"]}]}, "fallbacks: unknown 'zz'"),
    ({"models": [{"name": "a", "tiers": ["gold"]}]}, "tiers: unknown 'gold'"),
    ({"models": [{"name": "a", "replicas": 1.5}]}, "replicas: expected a whole number"),
    ({"models": [{"name": "a", "usd_per_1k_prompt_tokens": -1}]}, "prices must be finite and >= 0"),
    ({"models": [{"name": "a"}], "default_tier": "gold"}, "default_tier 'gold'"),
    ({"models": [{"name": "a"}], "tiers": {"free": {"shed_waiting": -1}}, "default_tier": "free"}, "must be >= 0"),
    ({"models": [{"name": "a"}], "tiers": {"free": {"shed_in_flight": -2}}, "default_tier": "free"}, "must be >= 0"),
    ({"models": [{"name": "a"}], "auto": [{"model": "zz"}]}, "auto rule 'zz': unknown 'zz'"),
    ({"models": [{"name": "a"}], "cascades": {"a": {"to": "a"}}}, "re-asks itself"),
    ({"models": [{"name": "a"}], "splits": {"s": {"weights": {"a": 0}}}}, "positive sum"),
    ({"models": [{"name": "a"}], "splits": {"s": {"weights": {"a": 1}, "sticky": "ip"}}}, "sticky must be one of"),
    ({"models": [{"name": "auto"}]}, "taken by 'auto'"),
    ({"models": [{"name": "a"}], "embedding": {"name": "a"}}, "embedding model name 'a' is empty or taken"),
    ({"models": [{"name": "a"}], "embedding": {"usd_per_1k_tokens": -1}}, "usd_per_1k_tokens must be finite"),
    ({"models": [{"name": "a"}], "embedding": {"tiers": ["gold"]}}, "embedding tiers: unknown 'gold'"),
    ({"models": [{"name": "a"}], "embedding": {"dim": 3}}, "embedding: unknown field(s) dim"),
])
def test_mistakes_are_refused_saying_where_and_why(raw, message):
    with pytest.raises(ModelsFileError) as err:
        parse(raw)
    assert message in str(err.value)


def test_a_file_that_does_not_parse_names_itself(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[models]\nname = ")
    with pytest.raises(ModelsFileError, match="bad.toml: TOMLDecodeError"):
        models_file.load(bad)
    with pytest.raises(ModelsFileError, match="cannot read the models file"):
        models_file.load(tmp_path / "missing.toml")


def suite(*argv: str):
    import argparse

    from services.up import add_args, suite_models
    parser = argparse.ArgumentParser()
    add_args(parser)
    return suite_models(parser.parse_args(list(argv)))


def test_up_serves_the_installed_default_suite_and_narrows_it_by_name():
    mf, files = suite()
    assert [(m.name, m.replicas) for m in mf.models] == [("SmolLM2-135M-Instruct", 1), ("gemma-3-270m", 1)]
    assert files["gemma-3-270m"].name == "gemma-3-270m-q4_k_m.gguf" and files["SmolLM2-135M-Instruct"].is_file()
    mf, files = suite("--models", "SmolLM2-135M-Instruct", "--replicas", "2")
    assert [(m.name, m.replicas, m.fallbacks) for m in mf.models] == [("SmolLM2-135M-Instruct", 2, ())]   # no unserved fallback
    with pytest.raises(SystemExit, match="--models: nope not in the suite"):
        suite("--models", "nope")
    with pytest.raises(SystemExit, match="--replicas must be >= 1"):
        suite("--replicas", "0")


def test_up_refuses_a_models_file_whose_model_is_not_installed(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[[models]]\nname = "x"\nfile = "no-such-model"\n')
    with pytest.raises(SystemExit, match="model 'x': file 'no-such-model' is not installed"):
        suite("--models-file", str(f))


def test_a_tier_sheds_at_any_of_its_thresholds_per_replica():
    t = TierSpec("t", shed_waiting=4, shed_pending_tokens=500, shed_in_flight=6)
    assert not t.sheds(3, 499, 5)
    assert t.sheds(4, 0, 0) and t.sheds(0, 500, 0) and t.sheds(0, 0, 6)
    assert not TierSpec("never").sheds(10**6, 10**9, 10**6)           # 0 = never, each
