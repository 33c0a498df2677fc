"""Structured output on the real models (SmolLM2-135M-Instruct and Gemma 3 270M, their GGUF kernels): decoding
constrained by xgrammar to a response format.

- 200 generated JSON schemas per model (nested objects, arrays, enums, number ranges, string lengths, required
  fields), decoded together in one batch: every answer parses and validates with `jsonschema`.
- The mask only removes tokens: greedy output with a format equals greedy output without it up to the first
  token the format refuses, and all of it when the free answer already conforms.
- It composes with speculative decoding (proposals checked against the matcher, rolled back), prefix caching
  and preemption: the same tokens each way.
- Regex and EBNF grammars; a format the engine cannot read is InvalidRequestError with its message.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import xgrammar as xgr

from services.inference.config import engine_config
from services.inference.engine.engine import InvalidRequestError
from services.inference.engine.factory import build_engine
from services.inference.models import catalog
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.registry import load_model
from services.inference.models.tokenizer import Tokenizer
from services.inference.sampling import ResponseFormat, SamplingParams
from tests.conftest import assert_all_blocks_free

GEMMA = catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf"
NUM_SCHEMAS = 200
WORDS = ["name", "title", "city", "color", "size", "count", "price", "score", "level", "kind", "owner", "tags",
         "items", "status", "rating", "year", "active", "label", "note", "code"]
THINGS = ["a book", "a city", "a user account", "a pet", "a product", "a song", "a recipe", "a car", "a planet",
          "a movie", "a football team", "an order", "a weather report", "a laptop", "a school"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema: 1-4 properties of every kind, some nested; every length bounded, so that a complete
    answer fits in the test's max_tokens."""
    names = rng.sample(WORDS, rng.randint(1, 4))
    props = {n: random_value(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_value(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "array", "object"] if depth < 2 else
                      ["string", "integer", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 16)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no", "open", "closed"],
                                   rng.randint(2, 4))}
    if kind == "array":
        item = rng.choice([{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 99},
                           {"enum": ["a", "b", "c"]}])
        return {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    return random_schema(rng, depth + 1)


@pytest.fixture(scope="module")
def smollm2(model_gguf, tokenizer):
    return build_engine(engine_config(quantization="gguf", kv_cache_memory_gb=0.5), model=model_gguf,
                        tokenizer=tokenizer)


@pytest.fixture(scope="module")
def gemma():
    if not GEMMA.is_file():
        pytest.fail(f"{GEMMA} missing: `make install` assembles it")
    gguf = GGUFFile(GEMMA)
    return build_engine(engine_config(quantization="gguf", kv_cache_memory_gb=0.5),
                        model=load_model(gguf, quantization="gguf"), tokenizer=Tokenizer.from_gguf(gguf))


def chat_prompt(engine, text: str, system: str | None = None) -> list[int]:
    if engine.tokenizer.chat_template is None:           # Gemma 3 270M is pretrained: a raw prompt
        return engine.tokenizer.encode(f"{text}\nJSON:")
    system_message = [{"role": "system", "content": system}] if system else []
    return engine.tokenizer.encode(engine.render_chat([*system_message, {"role": "user", "content": text}]))


@pytest.mark.parametrize("model", ["smollm2", "gemma"])
def test_answers_to_200_generated_schemas_parse_and_validate(model, request):
    engine = request.getfixturevalue(model)
    rng = random.Random(24)
    schemas = [random_schema(rng) for _ in range(NUM_SCHEMAS)]
    prompts = [chat_prompt(engine, f"Describe {rng.choice(THINGS)} as a JSON object with the fields "
                                   f"{', '.join(s['properties'])}.") for s in schemas]
    # SmolLM2: greedy and sampled rows alike; Gemma greedy (a sampled row costs ~4x a greedy one over its 262k
    # vocabulary, and its sampled answers run longest: the CI run's time)
    sampled = (lambda i: i % 2 == 0) if model == "smollm2" else (lambda i: False)
    params = [SamplingParams(temperature=0.8 if sampled(i) else 0.0, seed=i, max_tokens=512,
                             response_format=ResponseFormat("json_schema", json.dumps(s), strict=i % 3 == 0))
              for i, s in enumerate(schemas)]
    outs = engine.generate(prompts, params)
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    assert_all_blocks_free(engine)


def test_a_format_changes_greedy_output_only_where_the_free_answer_leaves_it(smollm2, gemma):
    """The mask only removes tokens: up to the first token the format refuses, constrained greedy equals free
    greedy; an answer that conforms throughout (SmolLM2's sentiment answer) is the same with and without.
    Each runs alone: a step's rounding depends on how many rows share it (so would free greedy's own tokens),
    and a near-tie can fall either way."""
    system = "You answer with raw JSON only."
    cases = [(smollm2, "Respond in JSON: {\"sentiment\": \"positive\" or \"negative\"} for the text 'I love it'.",
              system, True),
             (smollm2, "Convert to JSON: name Alice, age 30.", None, False),                # a trailing comma
             (smollm2, "Respond in JSON: {\"color\": <a color>} for the sky.", None, False),  # a code fence
             (gemma, "A JSON object with the keys name and age for Alice, 30:", None, False)]
    fmt = ResponseFormat("json_object")
    for engine, text, system_prompt, conforms in cases:
        prompt = chat_prompt(engine, text, system_prompt)
        (free,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=64))
        (constrained,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=64, response_format=fmt))
        matcher = engine.grammars.matcher(engine.compile_format(fmt))
        agree = 0
        for t in free.new_token_ids:
            if not matcher.accept_token(t):
                break
            agree += 1
        assert constrained.new_token_ids[:agree] == free.new_token_ids[:agree], text
        if conforms:
            assert agree == len(free.new_token_ids) and free.finish_reason == "stop"
            assert constrained.new_token_ids == free.new_token_ids and json.loads(constrained.text)
        else:
            assert agree < len(free.new_token_ids), free.text    # the free answer leaves JSON there
            assert constrained.new_token_ids[agree] != free.new_token_ids[agree]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "tags", "age"], "additionalProperties": False}
QUESTIONS = ["Describe a person as JSON.", "Give me a JSON record for a user called Bob.",
             "A JSON object for a customer, please.", "Write JSON describing your best friend.",
             "Return a JSON profile for Alice.", "JSON for an employee named Carol.",
             "Fill in this JSON form for a student.", "Make up a JSON user."]


def constrained_run(engine, questions=QUESTIONS) -> list[list[int]]:
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    prompts = [chat_prompt(engine, q) for q in questions]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=96, response_format=fmt))
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert_all_blocks_free(engine)
    return [o.new_token_ids for o in outs]


def test_it_composes_with_speculative_decoding(make_engine):
    """n-gram proposals (JSON repeats itself) are checked against the matcher, which rolls back what the target
    rejects: greedy tokens as without them, on the served path (the file's blocks)."""
    plain = make_engine("float32", quantization="gguf")
    spec = make_engine("float32", quantization="gguf", speculative="ngram", num_speculative_tokens=4, spec_max_batch=4)
    questions = QUESTIONS[:4]
    assert constrained_run(spec, questions) == constrained_run(plain, questions)
    stats = spec.spec_stats
    assert stats.draft_tokens > 0 and 0 < stats.accepted_tokens < stats.draft_tokens, stats


def test_it_composes_with_prefix_caching_and_preemption(make_engine):
    """The prompts again: their blocks come from the prefix cache, and the answers do not change. A KV pool too
    small for all eight at once: requests are preempted and recomputed, their matchers kept. In float32: a
    prompt's tail computed after a cache hit, or a preempted request's recomputation, runs other kernels than
    the first pass, and on the file's int8-quantized activations such a last-bit difference can tip a near-tie
    (JSON's whitespace has many), as test_engine_batching's preemption test says."""
    plain = make_engine("float32")
    reference = constrained_run(plain)
    before = plain.stats().prefix_cache_hit_tokens_total
    assert constrained_run(plain) == reference
    assert plain.stats().prefix_cache_hit_tokens_total > before
    longest = max(len(chat_prompt(plain, q)) for q in QUESTIONS) + 96
    tiny = make_engine("float32", num_kv_blocks=(longest // 16 + 1) * 3, max_model_len=longest + 16)
    assert constrained_run(tiny) == reference
    assert tiny.stats().num_preemptions_total > 0


def test_regex_and_ebnf_grammars(smollm2):
    prompt = chat_prompt(smollm2, "Is the sky blue? Answer yes or no, then a reason.")
    regex = r"(yes|no), because [a-z ]{1,40}\."
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    outs = smollm2.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=48, response_format=ResponseFormat("regex", regex)),
        SamplingParams(temperature=0, max_tokens=48, response_format=ResponseFormat("grammar", grammar))])
    import re
    assert re.fullmatch(regex, outs[0].text) and outs[0].finish_reason == "stop", outs[0].text
    assert outs[1].text in ("The answer is yes.", "The answer is no.")


@pytest.mark.parametrize("fmt, message", [
    (ResponseFormat("json_schema", '{"type": "objec"}'), 'Unsupported type "objec"'),
    (ResponseFormat("json_schema", '{"type": '), "Failed to parse JSON"),
    (ResponseFormat("regex", "[a-"), "Unclosed '['"),
    (ResponseFormat("grammar", "root ::= undefined_rule"), "undefined_rule"),
    (ResponseFormat("json_schema", ""), "needs its spec"),
    (ResponseFormat("yaml", "a: b"), "must be one of json_object"),
])
def test_a_format_the_engine_cannot_read_is_refused_with_its_message(smollm2, fmt, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        smollm2.add_request([1, 2, 3], SamplingParams(max_tokens=4, response_format=fmt))
    assert "/project/cpp" not in str(err.value)          # the engine's message, not its source location
    with pytest.raises(InvalidRequestError, match="cannot be combined"):
        smollm2.add_request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True,
                                                      response_format=ResponseFormat("json_object")))
    assert not smollm2.has_unfinished_requests()


def test_special_tokens_never_appear_inside_a_constrained_answer(smollm2):
    """Special tokens are given to xgrammar as empty: `<|im_start|>` cannot be spelled inside a JSON string."""
    compiled = smollm2.compile_format(ResponseFormat("json_schema", json.dumps(
        {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})))
    matcher = smollm2.grammars.matcher(compiled)
    for t in smollm2.tokenizer.encode('{"s": "', add_special_tokens=False):
        assert matcher.accept_token(t)
    mask = xgr.allocate_token_bitmask(1, smollm2.hparams.vocab_size)
    matcher.fill_next_token_bitmask(mask, 0)
    allowed = lambda t: bool(mask[0, t // 32] >> (t % 32) & 1)  # noqa: E731
    special = sorted(smollm2.tokenizer.special_token_ids - {smollm2.tokenizer.eos_token_id})
    assert special and not any(allowed(t) for t in special)
    assert allowed(smollm2.tokenizer.encode("hello", add_special_tokens=False)[0])


@pytest.mark.parametrize("choice", ["required", "function"])
def test_required_and_named_tool_calls_always_parse_and_validate(smollm2, choice):
    """Tool calls constrained to their syntax and each function's parameters: 12 conversations with generated
    tools, every answer is calls only (finish on EOS), each call's arguments valid against its function's schema."""
    from services.inference.tools import Conversation, Tool, ToolCallParser

    rng = random.Random(7 if choice == "required" else 8)
    prompts, params, conversations = [], [], []
    for i in range(12):
        tools = [Tool(f"{rng.choice(['get', 'find', 'make', 'list'])}_{w}_{j}", f"Does something with {w}.",
                      random_schema(rng)) for j, w in enumerate(rng.sample(WORDS, rng.randint(1, 3)))]
        conv = Conversation([{"role": "user", "content": f"Please help with {rng.choice(THINGS)}."}], tools, choice,
                            tools[-1].name if choice == "function" else "", parallel=i % 4 == 0)
        conv.check()
        conversations.append(conv)
        prompts.append(smollm2.tokenizer.encode(smollm2.render_chat(conv.template_messages(False))))
        params.append(SamplingParams(temperature=0.0 if i % 3 else 0.7, seed=i, max_tokens=256,
                                     response_format=ResponseFormat("structural_tag", conv.structural_tag())))
    for conv, out in zip(conversations, smollm2.generate(prompts, params)):
        parser = ToolCallParser()
        content, calls = parser.feed(out.text)
        content += parser.finish()
        if out.finish_reason == "length" and conv.parallel:     # calls may go on; those made are whole
            assert calls, out.text
        else:
            assert out.finish_reason == "stop" and content == "" and calls, out.text
        if conv.choice == "function" or not conv.parallel:
            assert len(calls) == 1 or (out.finish_reason == "length" and conv.parallel)
        schemas = {t.name: t.parameters for t in conv.tools}
        for call in calls:
            assert call.name in schemas and (conv.choice != "function" or call.name == conv.function)
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert_all_blocks_free(smollm2)
