"""The text of generated tokens as a completion returns it: cut before the first stop string, and streamed
without half characters or text that may yet turn out to start a stop string."""

from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string (which OpenAI's API leaves out), and whether one was found."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


class Text:
    """Incremental decoding: the text of the tokens so far, released once complete (no half UTF-8 characters),
    never past a stop string, and holding back an end that may be the start of one."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stops, self.tokens, self.sent, self.stopped = tokenizer, stops, [], "", False

    def add(self, token: int | None) -> str:
        """The new text after ``token`` (None: the end, releasing what was held back)."""
        if self.stopped:
            return ""
        if token is not None:
            self.tokens.append(token)
        text, self.stopped = cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stops)
        if token is not None and not self.stopped:
            if text.endswith("\ufffd"):
                return ""
            held = max((n for stop in self.stops for n in range(len(stop), 0, -1) if text.endswith(stop[:n])),
                       default=0)
            text = text[:len(text) - held]
        new, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return new
