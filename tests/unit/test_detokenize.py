"""Streaming text with stop strings: nothing is sent that a later stop match would cut."""

from __future__ import annotations

import pytest

from services.inference.engine.detokenize import TextState


def stream(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], str, bool]:
    state = TextState(tokenizer, stop)
    deltas = []
    for tok in tokenizer.encode(text):
        deltas.append(state.push([tok]))
        if state.stopped:
            break
    deltas.append(state.finish())
    return deltas, "".join(deltas), state.stopped


def test_text_before_a_stop_string_is_sent_and_the_stop_string_is_not(tokenizer):
    deltas, text, stopped = stream(tokenizer, "alpha beta STOP gamma", ("STOP",))
    assert stopped and text == "alpha beta "
    assert not any("ST" in d for d in deltas)


def test_a_partial_stop_string_is_held_back_then_released(tokenizer):
    deltas, text, stopped = stream(tokenizer, "one two STAR three", ("STOP",))
    assert not stopped and text == "one two STAR three"


@pytest.mark.parametrize("stop", [("\n\n",), ("😀",), ("b", "zz")])
def test_stop_strings_spanning_tokens_and_multibyte_characters(tokenizer, stop):
    text = "a😀\n\nb zz"
    _, out, stopped = stream(tokenizer, text, stop)
    assert stopped and out == text[:min(text.index(s) for s in stop)]


def test_without_stop_strings_every_delta_is_sent_immediately(tokenizer):
    state = TextState(tokenizer, ())
    ids = tokenizer.encode("héllo wörld 你好")
    deltas = [state.push([t]) for t in ids]
    assert "".join(deltas) + state.finish() == "héllo wörld 你好"
    assert all("\ufffd" not in d for d in deltas)
