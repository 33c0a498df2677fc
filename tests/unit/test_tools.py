"""Tool calling's pure parts (services/inference/tools.py): the parser of calls out of streamed text, the
rendering of tools and calls for a template without a tools section, and the request checks."""

from __future__ import annotations

import json

import pytest

from services.common.errors import InvalidArgumentError
from services.inference.tools import TOOLS_PROMPT, Conversation, Tool, ToolCallParser, parse_parameters

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse(pieces: list[str]) -> tuple[str, list]:
    parser = ToolCallParser()
    content, calls = [], []
    for p in pieces:
        text, new = parser.feed(p)
        content.append(text)
        calls += new
    content.append(parser.finish())
    return "".join(content), calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_are_parsed_out_of_text_however_it_is_split(size):
    text = "Let me check." + CALL + "\n" + CALL.replace("Paris", "Rome")
    content, calls = parse([text[i:i + size] for i in range(0, len(text), size)])
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Rome"})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id


def test_text_that_only_looks_like_a_call_stays_content():
    assert parse(["a <tool", "_cal", "l is a tag"]) == ("a <tool_cal" + "l is a tag", [])
    assert parse(["x <tool_call>not json</tool_call> y"]) == ("x <tool_call>not json</tool_call> y", [])
    assert parse(["<tool_call>\n{\"name\": \"f\", \"argu"]) == ("<tool_call>\n{\"name\": \"f\", \"argu", [])  # cut short
    assert parse(["ends with <tool_"]) == ("ends with <tool_", [])
    content, calls = parse(['<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'])
    assert content == "" and json.loads(calls[0].arguments) == {"a": 1}      # arguments written as a JSON string


def test_a_template_without_tools_gets_them_in_the_system_prompt_and_calls_as_text():
    weather = Tool("get_weather", "Weather by city", {"type": "object", "properties": {"city": {"type": "string"}}})
    conv = Conversation([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]},
                         {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}], [weather])
    conv.check()
    out = conv.template_messages(template_renders_tools=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(weather.openai()) in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": CALL}
    assert out[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}
    none = Conversation([{"role": "user", "content": "hi"}], [weather], "none")
    assert none.template_messages(False) == [{"role": "user", "content": "hi"}] and none.structural_tag() is None
    alone = Conversation([{"role": "user", "content": "hi"}], [weather])
    assert alone.template_messages(False)[0]["content"] == TOOLS_PROMPT.format(tools=json.dumps(weather.openai()))
    hf = conv.template_messages(template_renders_tools=True)        # a template with a tools section takes them as is
    assert hf[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


@pytest.mark.parametrize("tools, choice, function, message", [
    ([Tool("bad name")], "auto", "", "must be 1-64 of"),
    ([Tool("f"), Tool("f")], "auto", "", "same name"),
    ([], "required", "", "needs tools"),
    ([Tool("f")], "function", "g", "not among the tools"),
    ([Tool(f"f{i}") for i in range(129)], "auto", "", "at most 128 tools"),
])
def test_bad_tool_settings_are_refused(tools, choice, function, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Conversation([{"role": "user", "content": "hi"}], tools, choice, function).check()


def test_a_tool_message_must_answer_an_earlier_call():
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "name": "f", "arguments": "{}"}]}
    for messages in ([{"role": "tool", "content": "42", "tool_call_id": "call_1"}],
                     [{"role": "user", "content": "hi"}, call, {"role": "tool", "content": "42", "tool_call_id": "call_9"}]):
        with pytest.raises(InvalidArgumentError, match="must answer a call"):
            Conversation(messages, [Tool("f")]).check()
    Conversation([{"role": "user", "content": "hi"}, call, {"role": "tool", "content": "42", "tool_call_id": "call_1"}],
                 [Tool("f")]).check()


def test_parameters_must_be_a_json_schema_object():
    assert parse_parameters("f", "") == {"type": "object", "properties": {}}
    for bad in ("[1, 2]", "{not json"):
        with pytest.raises(InvalidArgumentError, match="parameters of tool 'f'"):
            parse_parameters("f", bad)
