"""Engine configuration written once (services/inference/config.py): every setting is one field of one
section, and the flags, their STRATA_* variables and flat construction are generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from services.inference.config import (SECTIONS, EngineConfig, add_engine_args, engine_config,
                                       engine_config_from_args, env_name, flag_name)

FIELDS = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]


def parse(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_config_from_args(parser.parse_args(list(argv)))


def test_every_setting_is_one_field_with_help_and_a_flag():
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names))                           # flat names are unambiguous
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    flags = {o for a in parser._actions for o in a.option_strings}
    assert all(f.metadata["help"] and flag_name(f) in flags for f in FIELDS)


def test_no_flags_give_the_fields_defaults(monkeypatch):
    for f in FIELDS:
        monkeypatch.delenv(env_name(f), raising=False)
    assert parse() == EngineConfig() == engine_config()


def test_the_historical_flags_and_variables_keep_working(monkeypatch):
    for f in FIELDS:
        monkeypatch.delenv(env_name(f), raising=False)
    c = parse("--quantization", "gguf", "--no-prefix-caching", "--kv-cache-gb", "0.5", "--threads", "2",
              "--speculative", "draft", "--draft-quantization", "none", "--num-speculative-tokens", "3")
    assert (c.model.quantization, c.cache.enable_prefix_caching, c.cache.kv_cache_memory_gb) == ("gguf", False, 0.5)
    assert (c.device.num_threads, c.spec.speculative, c.spec.draft_quantization) == (2, "draft", None)
    assert c.spec.num_speculative_tokens == 3 and parse("--quantization", "none").model.quantization is None
    for name in ("STRATA_MODEL_PATH", "STRATA_MODEL_NAME", "STRATA_DTYPE", "STRATA_DEVICE", "STRATA_QUANTIZATION",
                 "STRATA_KV_CACHE_GB", "STRATA_SPECULATIVE", "STRATA_DRAFT_MODEL_PATH"):
        assert name in {env_name(f) for f in FIELDS}


def test_every_variable_sets_its_flags_default_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("STRATA_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("STRATA_PREFIX_CACHING", "off")
    monkeypatch.setenv("STRATA_SPECULATIVE", "ngram")
    c = parse()
    assert (c.scheduler.max_num_seqs, c.cache.enable_prefix_caching, c.spec.speculative) == (7, False, "ngram")
    assert parse("--max-num-seqs", "9", "--prefix-caching").scheduler.max_num_seqs == 9


@pytest.mark.parametrize("name,value,says", [("STRATA_MAX_NUM_SEQS", "many", "an integer"),
                                             ("STRATA_DTYPE", "fp8", "auto, float32, bfloat16"),
                                             ("STRATA_PREFIX_CACHING", "maybe", "true")])
def test_a_malformed_variable_stops_with_a_message_naming_it(monkeypatch, capsys, name, value, says):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        parse()
    err = capsys.readouterr().err
    assert name in err and says in err


def test_bad_values_are_refused_by_their_section():
    with pytest.raises(ValueError, match="dtype must be one of"):
        engine_config(dtype="fp8")
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        engine_config(max_num_seqs=0)
    with pytest.raises(ValueError, match="num_speculative_tokens must be in"):
        engine_config(num_speculative_tokens=17)
    with pytest.raises(TypeError, match="unknown engine setting 'dtypes'"):
        engine_config(dtypes="float32")


def test_flat_settings_land_in_their_sections():
    c = engine_config(dtype="float32", block_size=8, max_num_batched_tokens=512, spec_row_cost=0.0, device="cpu")
    assert (c.model.dtype, c.cache.block_size, c.scheduler.max_num_batched_tokens) == ("float32", 8, 512)
    assert (c.spec.spec_row_cost, c.device.device) == (0.0, "cpu")
    assert c.with_settings(block_size=32).cache == dataclasses.replace(c.cache, block_size=32)
