"""IncrementalDetokenizer: the pushed pieces always add up to the tokenizer's own decode."""

from __future__ import annotations

import random

import pytest

from llava_sessions.handler.engine.detokenizer import IncrementalDetokenizer
from llava_sessions.tiny_model import build_tokenizer

MIXED_TEXT = "Café ☕ costs 3€; 世界你好！ The 🐈‍⬛ sat 🙂👍🏽 on ñandú — naïve 日本語テキスト 🇯🇵 done."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    return pieces, detokenizer.flush()


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_add_up_to_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    vocab = len(tokenizer)
    for _ in range(1500):
        # Any id, special tokens and ids past the tokenizer (the model's embedding is larger) included.
        ids = [rng.randrange(vocab + 8) for _ in range(rng.randrange(1, 48))]
        pieces, rest = stream(tokenizer, ids, skip_special_tokens)
        assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_random_sequences_of_byte_tokens_never_emit_a_broken_character(tokenizer):
    # Tokens that are lone bytes >= 0x80 make partial UTF-8 all the time.
    byte_ids = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert len(byte_ids) > 50
    rng = random.Random(99)
    words = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    for _ in range(1000):
        ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.choice(words) for _ in range(rng.randrange(1, 40))]
        pieces, rest = stream(tokenizer, ids)
        assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True), ids
        # A held-back tail is only ever released whole: no piece ends in U+FFFD.
        assert not any(piece.endswith("\ufffd") for piece in pieces)


def test_emoji_and_cjk_come_out_whole(tokenizer):
    ids = tokenizer.encode(MIXED_TEXT, add_special_tokens=False)
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) == MIXED_TEXT and rest == ""
    assert not any("\ufffd" in piece for piece in pieces)
    # Multi-byte characters take several tokens here: some pushes return nothing.
    assert len(ids) > len([p for p in pieces if p])
    assert any("🙂" in piece for piece in pieces)


def test_a_character_is_held_until_its_last_byte(tokenizer):
    ids = tokenizer.encode("a世", add_special_tokens=False)
    assert len(ids) >= 3  # "a" and the three bytes of 世 in at least two tokens
    pieces, rest = stream(tokenizer, ids)
    assert pieces[0] == "a"
    assert pieces[-1].endswith("世") and all(piece == "" for piece in pieces[1:-1])
    assert rest == ""


def test_special_tokens_are_skipped_and_an_unfinished_tail_is_flushed(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("ok", add_special_tokens=False) + [eos]
    pieces, rest = stream(tokenizer, ids)
    assert pieces[-1] == "" and "".join(pieces) == "ok" and rest == ""

    cut = tokenizer.encode("世", add_special_tokens=False)[:-1]  # ends mid-character
    pieces, rest = stream(tokenizer, cut)
    assert "".join(pieces) == "" and rest == tokenizer.decode(cut) and rest.endswith("\ufffd")
