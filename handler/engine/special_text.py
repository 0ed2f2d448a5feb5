"""A prompt is text: where it spells a special token ("</s>", "<s>"), that spelling stays text.

A plain tokenizer call turns every spelling of a special token into the token itself, so a
prompt could close its own turn with "</s>" and write the next one. The chat template's own
specials (a first turn's "<s>", the image placeholder) must stay specials, so the turn cannot
simply be encoded with special spellings as text.

The tokenizer splits a text at its special tokens and tokenises the stretches between them on
their own. So a turn whose prompt spells a special token is encoded as usual, and then only the
stretch from the last template special before the prompt to the first one after it is encoded
again with special spellings as text. A stretch that does not start the text is re-encoded as
such (a Metaspace pre-tokenizer that marks only a text's start, "first", must not mark it).
Start-up checks that this gives the tokenizer's own ids for prompts that spell nothing; where it
does not, or where the tokenizer is not a `tokenizers` one, a prompt that spells a special token
is refused instead.
"""

from __future__ import annotations

import re


def private_backend(tokenizer, specials_as_text: bool):
    """A private copy of the tokenizer's `tokenizers` backend, or None where it has none.

    Private: padding, truncation or special-token splitting that another caller leaves on the
    shared backend cannot reach it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer

        private = Tokenizer.from_str(backend.to_str())
        private.no_padding()
        private.no_truncation()
        private.encode_special_tokens = specials_as_text
    except Exception:  # not a `tokenizers` backend after all
        return None
    return private


class SpecialText:
    def __init__(self, tokenizer, parsed=None):
        """``parsed``: the caller's private backend copy with specials parsed, if it has one."""
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = {token.content: token_id for token_id, token in added.items() if token.special and token.content}
        self._special_ids = frozenset(specials.values())
        # Longest first, as the tokenizer matches them.
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None
        )
        self._parsed = self._literal = self._literal_inner = None
        self._prefix: list[int] = []
        self._suffix: list[int] = []
        self.usable = False  # set by verify()
        if self._pattern is None:
            return
        self._parsed = parsed or private_backend(tokenizer, specials_as_text=False)
        self._literal = private_backend(tokenizer, specials_as_text=True)
        self._literal_inner = _unmarked(tokenizer, self._literal) if self._literal is not None else None
        if self._parsed is None or self._literal is None or self._literal_inner is None:
            self._parsed = None
            return
        self._prefix, self._suffix = self._added_around("a")

    @property
    def has_specials(self) -> bool:
        return self._pattern is not None

    def spelled(self, prompt: str) -> str | None:
        """The first special token the prompt spells, if any."""
        found = self._pattern.search(prompt) if self._pattern is not None else None
        return found.group() if found else None

    def encode(self, text: str, start: int, end: int, add_special_tokens: bool) -> list[int]:
        """Ids of ``text`` (a whole turn) where text[start:end] (the prompt) spells specials as text.

        Call only when ``usable``.
        """
        parsed = self._parsed.encode(text, add_special_tokens=False)
        ids, offsets = parsed.ids, parsed.offsets
        # The template's specials around the prompt: wholly before it or wholly after it.
        cut_index, cut_from = 0, 0
        end_index, cut_to = len(ids), len(text)
        for index, (token, (token_start, token_end)) in enumerate(zip(ids, offsets)):
            if token not in self._special_ids:
                continue
            if token_end <= start:
                cut_index, cut_from = index + 1, token_end
            elif token_start >= end:
                end_index, cut_to = index, token_start
                break
        literal = self._literal if cut_from == 0 else self._literal_inner
        middle = literal.encode(text[cut_from:cut_to], add_special_tokens=False).ids
        body = ids[:cut_index] + middle + ids[end_index:]
        return self._prefix + body + self._suffix if add_special_tokens else body

    def verify(self, samples: list[tuple[str, int, int, bool]]) -> bool:
        """Does ``encode`` give the tokenizer's own ids on these turns (prompts spelling nothing)?

        No samples, no proof: not usable.
        """
        if self._parsed is None or not samples:
            self.usable = False
            return False
        try:
            self.usable = all(
                self.spelled(text[start:end]) is None
                and self.encode(text, start, end, add) == self._parsed.encode(text, add_special_tokens=add).ids
                for text, start, end, add in samples
            )
        except Exception:
            self.usable = False
        return self.usable

    def _added_around(self, probe: str) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor puts before and after a text (a first turn's "<s>")."""
        bare = self._parsed.encode(probe, add_special_tokens=False).ids
        framed = self._parsed.encode(probe, add_special_tokens=True).ids
        for at in range(len(framed) - len(bare) + 1):
            if framed[at : at + len(bare)] == bare:
                return framed[:at], framed[at + len(bare) :]
        self._parsed = None  # a post-processor that rewrites the text's own ids: never usable
        return [], []


def _unmarked(tokenizer, literal):
    """The copy for stretches that do not start the text: ``literal`` itself, or where its Metaspace
    pre-tokenizer marks only a text's start ("first"), which marks nothing there, a copy that
    never marks (None if it cannot be made)."""
    from tokenizers import pre_tokenizers

    current = literal.pre_tokenizer
    if not (isinstance(current, pre_tokenizers.Metaspace) and current.prepend_scheme == "first"):
        return literal
    copy = private_backend(tokenizer, specials_as_text=True)
    if copy is not None:
        copy.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=current.replacement, prepend_scheme="never", split=current.split
        )
    return copy
