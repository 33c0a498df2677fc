"""Tool calling: the tools a conversation offers, how the model is told about them, the constraint on its answer,
and the calls parsed out of what it writes.

The call syntax is the Hermes / Qwen one, the most common among open chat models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. A chat template with a tools section (it names `tools`) renders the tools and the calls in
the history itself; one without (SmolLM2's) gets Strata's system-prompt format, TOOLS_PROMPT below: the tools'
JSON after the conversation's own system prompt, a call in the history as its <tool_call> block, a tool's
result as a user turn in a <tool_response> block. Decoding is constrained by xgrammar's structural tag for this
syntax: `required` and a named function allow only calls (each one's arguments valid against its function's
parameters); `auto` leaves text free and constrains a call once the model opens one, so a call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgumentError
from services.inference.sampling.params import MAX_JSON_WHITESPACE

ROLES = ("system", "user", "assistant", "tool")
MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions, as JSON schemas:
<tools>
{tools}
</tools>

To call a function, write for each call a <tool_call></tool_call> block holding a JSON object with the
function's name and its arguments:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def openai(self) -> dict[str, Any]:
        """The tool in OpenAI's shape, as chat templates and the prompt show it."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str            # JSON text


@dataclass(slots=True)
class Conversation:
    """Messages as the chat template takes them, and the tools they offer (a validated request)."""

    messages: list[dict[str, Any]]
    tools: list[Tool]
    choice: str = "auto"      # auto | none | required | function
    function: str = ""        # choice "function": its name
    parallel: bool = True

    @property
    def offers_tools(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def check(self) -> None:
        names = [t.name for t in self.tools]
        if len(self.tools) > MAX_TOOLS:
            raise InvalidArgumentError(f"at most {MAX_TOOLS} tools")
        for name in names:
            if not NAME.fullmatch(name):
                raise InvalidArgumentError(f"tool name {name!r} must be 1-64 of [A-Za-z0-9_-]")
        if len(set(names)) != len(names):
            raise InvalidArgumentError("two tools have the same name")
        if self.choice in ("required", "function") and not self.tools:
            raise InvalidArgumentError(f"tool_choice {self.choice} needs tools")
        if self.choice == "function" and self.function not in names:
            raise InvalidArgumentError(f"tool_choice names {self.function!r}, which is not among the tools")
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            calls.update(c["id"] for c in m.get("tool_calls", ()))
            if m["role"] == "tool" and (not calls or m.get("tool_call_id") and m["tool_call_id"] not in calls):
                raise InvalidArgumentError(f"messages[{i}]: a tool message must answer a call an earlier assistant "
                                           "message made (its tool_call_id)")

    def template_messages(self, template_renders_tools: bool) -> list[dict[str, Any]]:
        """The messages for a template with a tools section (calls and results as it takes them), or for one
        without (Strata's format: tools in the system prompt, calls and results as text)."""
        if template_renders_tools:
            return [_hf_message(m) for m in self.messages]
        out = []
        for m in self.messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                blocks = "\n".join(call_block(c["name"], c["arguments"]) for c in m["tool_calls"])
                out.append({"role": "assistant", "content": f"{m['content']}\n{blocks}" if m["content"] else blocks})
            elif m["role"] == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        if self.offers_tools:
            prompt = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t.openai()) for t in self.tools))
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def structural_tag(self) -> str | None:
        """The constraint on the answer (an xgrammar structural tag, as JSON), or None without tools: `auto` leaves
        text free until the model opens a call; `required` allows calls only (one or more, one with
        parallel_tool_calls false), separated by newlines; a named function, exactly one call of it."""
        if not self.offers_tools:
            return None
        from xgrammar.structural_tag import (JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat,
                                             TriggeredTagsFormat)

        def tag(t: Tool) -> TagFormat:
            return TagFormat(begin=f'{OPEN}\n{{"name": "{t.name}", "arguments": ',
                             content=JSONSchemaFormat(json_schema=t.parameters, max_whitespace_cnt=MAX_JSON_WHITESPACE),
                             end=f"}}\n{CLOSE}")
        if self.choice == "function":
            fmt = tag(next(t for t in self.tools if t.name == self.function))
        elif self.choice == "required":
            fmt = TagsWithSeparatorFormat(tags=[tag(t) for t in self.tools], separator="\n", at_least_one=True,
                                          stop_after_first=not self.parallel)
        else:
            fmt = TriggeredTagsFormat(triggers=[OPEN], tags=[tag(t) for t in self.tools],
                                      stop_after_first=not self.parallel)
        return StructuralTag(format=fmt).model_dump_json()


def call_block(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        raise InvalidArgumentError(f"the arguments of a call to {name!r} in the history are not JSON") from None
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{CLOSE}"


def _hf_message(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": json.loads(c["arguments"] or "{}")}}
                             for c in m["tool_calls"]]
    return out


def parse_parameters(name: str, text: str) -> dict[str, Any]:
    if not text:
        return {"type": "object", "properties": {}}
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"the parameters of tool {name!r} are not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgumentError(f"the parameters of tool {name!r} must be a JSON Schema object")
    return schema


class ToolCallParser:
    """Splits the answer's text, as it streams, into content and calls. Text that may be the start of
    `<tool_call>` is held back until it is known not to be; a block is parsed when `</tool_call>` closes it.
    After the first call, whitespace between calls is not content. A block that does not parse (cut short by
    max_tokens) is content at the end."""

    def __init__(self) -> None:
        self._pending = ""        # held-back text: a possible start of OPEN, or an open block
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._in_call = False
                call = _parse_call(body)
                if call is None:                  # not a call after all: its text is content
                    content.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                    self.calls += 1
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                content.append(self._content(self._pending[:start]))
                self._pending = self._pending[start + len(OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._pending, OPEN)
            content.append(self._content(self._pending[:len(self._pending) - keep]))
            self._pending = self._pending[len(self._pending) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> str:
        """What is left, as content (an open block that never closed)."""
        rest = (OPEN + self._pending) if self._in_call else self._content(self._pending)
        self._pending, self._in_call = "", False
        return rest

    def _content(self, text: str) -> str:
        """Text outside blocks; after a call, whitespace alone (between and after calls) is not content."""
        return "" if self.calls and not text.strip() else text


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):             # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(args))


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0

