"""Per-request text output: incremental detokenization plus stop strings.

Text that might be the start of a stop string is held back (as vLLM does), so a stream never
sends text that a later stop match would have cut."""

from __future__ import annotations

from services.inference.models.tokenizer import IncrementalDetokenizer, Tokenizer


class TextState:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""       # all complete text so far (cut at a stop string once matched)
        self._sent = 0        # characters already handed out
        self.stopped = False  # a stop string matched

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the text delta that is safe to send now."""
        if self.stopped:
            return ""
        prev = len(self._text)
        self._text += self._detok.push(token_ids)
        if self._stop:
            search_from = max(0, prev - self._hold)
            hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
            if hits:
                self._text = self._text[:min(hits)]
                self.stopped = True
                return self._take(len(self._text))
            return self._take(len(self._text) - self._hold)
        return self._take(len(self._text))

    def finish(self) -> str:
        """Everything still held back, at the end of generation."""
        if not self.stopped:
            self._text += self._detok.flush()
        return self._take(len(self._text))

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta = self._text[self._sent:upto]
        self._sent = upto
        return delta
