"""Incremental detokenization: text for each new token, never a broken character.

A byte-level BPE token may hold part of a multi-byte UTF-8 character, and a
SentencePiece token's leading space depends on what precedes it, so the text of
one token cannot be decoded alone. As vLLM and TGI do, two offsets into the ids
are kept: ``prefix_offset`` (context decoded again for the comparison) and
``read_offset`` (where the text already returned ends). Each push decodes
``ids[prefix_offset:]`` and returns what it adds to ``ids[prefix_offset:read_offset]``;
while the decoded tail ends in U+FFFD (an incomplete UTF-8 sequence) nothing is
returned and the offsets stay put.

Invariant: ``"".join(push(t) for t in ids) + flush() == tokenizer.decode(ids, skip_special_tokens=...)``.
Torch-free; any tokenizer with transformers' ``decode(ids, skip_special_tokens=...)``.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            # Nothing new (a skipped special token), or a character is still incomplete.
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text held back at the end (a sequence that ends mid-character decodes to U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)
