"""Text in and out: the chat template, incremental detokenization and stop strings."""

from __future__ import annotations

from leanlm.serve.schema import Message

FALLBACK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # ChatML, as SmolLM2 uses


def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template (ChatML when it has none)."""
    plain = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in messages]
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True, chat_template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class TextStream:
    """Turns generated token ids into text pieces, holding back what a stop string might still complete.

    ``push`` returns the new text that is safe to send; once a stop string appears, ``stopped`` is set
    and the text ends just before it. ``flush`` returns what was held back when generation ends.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text = ""  # all text decoded so far (up to a stop string)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            return ""
        self.text = text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self.flush()
        safe = len(text) - self.hold
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent: safe], safe
        return piece

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
