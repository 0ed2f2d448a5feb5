"""llava_sessions.wire: the session-id rule, the session headers, and TGI's event framing."""

from __future__ import annotations

import json
import time

import pytest

from llava_sessions import wire
from llava_sessions.wire import (
    EventParser,
    MalformedEvent,
    format_expires,
    format_session_header,
    is_valid_session_id,
    iter_events,
    parse_session_header,
)

SID = "sess-0123456789abcdef0123456789abcdef"


# --- constants ---------------------------------------------------------------------------


def test_header_names_and_markers():
    assert wire.SESSION_HEADER == "X-Amzn-SageMaker-Session-Id"
    assert wire.CLOSED_SESSION_HEADER == "X-Amzn-SageMaker-Closed-Session-Id"
    assert wire.NEW_SESSION_HEADER == "X-Amzn-SageMaker-New-Session-Id"
    assert wire.NEW_SESSION == "NEW_SESSION"
    assert wire.CLOSE == "CLOSE"
    assert wire.EVENT_CONTENT_TYPE == "text/event-stream"


def test_the_pattern_is_sagemakers_as_aws_words_it():
    # The local runtime quotes it in its ValidationErrors, as the service does.
    assert wire.SESSION_ID_PATTERN.pattern == "^[a-zA-Z0-9](-*[a-zA-Z0-9])*$"
    assert wire.SESSION_ID_MAX_LEN == 256


# --- the session-id rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [SID, "a", "0", "Z", "a-b", "a--b", "a---------b", "A1-b2-C3", "9" * 256, "a" + "-b" * 127 + "c"],
)
def test_valid_session_ids(value):
    assert len(value) <= 256
    assert is_valid_session_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "-",
        "-a",
        "a-",
        "a--",
        "--a",
        "a_b",
        "a.b",
        "a b",
        " a",
        "a ",
        "a\n",
        "a\r\nX-Injected: 1",
        "a/b",
        "a:b",
        "NEW_SESSION",
        "é",
        "\u0661\u0662",  # Arabic-Indic digits: \w-ish, not SageMaker's [a-zA-Z0-9]
        "9" * 257,
        SID + "; Expires=2024-01-01T00:00:00Z",
        None,
        12,
        b"abc",
    ],
)
def test_invalid_session_ids(value):
    assert not is_valid_session_id(value)


def test_length_limit_is_256_characters():
    assert is_valid_session_id("a" * 256)
    assert not is_valid_session_id("a" * 257)
    assert is_valid_session_id("a-" * 127 + "ab")  # 256 with hyphens
    assert not is_valid_session_id("a-" * 128 + "a")  # 257


# --- Expires -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_700_000_000, "2023-11-14T22:13:20Z"),
        (1_700_000_000.999, "2023-11-14T22:13:20Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
    ],
)
def test_format_expires_is_utc(epoch, expected):
    assert format_expires(epoch) == expected


def test_format_expires_ignores_the_local_time_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        assert format_expires(1_700_000_000) == "2023-11-14T22:13:20Z"
        assert parse_session_header("s; Expires=2023-11-14T22:13:20Z") == ("s", 1_700_000_000.0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_format_session_header():
    assert format_session_header(SID, 1_700_000_000) == f"{SID}; Expires=2023-11-14T22:13:20Z"


@pytest.mark.parametrize("session_id", ["bad\r\nX-Injected: 1", "", "NEW_SESSION", "a" * 257, "a_b"])
def test_format_session_header_refuses_an_invalid_id(session_id):
    with pytest.raises(ValueError):
        format_session_header(session_id, 0)


@pytest.mark.parametrize("epoch", [0, 951_782_400, 1_767_225_600, 1_767_225_600.75, 4_102_444_799.5])
def test_parse_round_trips_the_formatted_header(epoch):
    value = format_session_header("sess-0123abcd", epoch)
    parsed = parse_session_header(value)
    assert parsed == ("sess-0123abcd", float(int(epoch)))
    assert format_session_header(*parsed) == value


@pytest.mark.parametrize(
    "value",
    [
        "sess-1; Expires=2026-01-01T00:00:00Z",
        "  sess-1 ;expires = 2026-01-01T00:00:00Z  ",
        "sess-1;EXPIRES=2026-01-01T00:00:00Z",
        "sess-1; Path=/; Expires=2026-01-01T00:00:00Z",
        "sess-1; Expires=2026-01-01T00:00:00Z; HttpOnly",
        "sess-1;\tExpires=2026-01-01T00:00:00Z",
    ],
)
def test_parse_tolerates_blanks_case_and_other_attributes(value):
    assert parse_session_header(value) == ("sess-1", 1_767_225_600.0)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sess-1",
        "sess-1;",
        "sess-1; garbage",
        "; Expires=2026-01-01T00:00:00Z",
        "sess_1; Expires=2026-01-01T00:00:00Z",
        "sess.1; Expires=2026-01-01T00:00:00Z",
        "-sess; Expires=2026-01-01T00:00:00Z",
        "sess-; Expires=2026-01-01T00:00:00Z",
        "NEW_SESSION; Expires=2026-01-01T00:00:00Z",
        "sess-1; Expires=",
        "sess-1; Expires",
        "sess-1; Expires=2026-01-01 00:00:00",
        "sess-1; Expires=2026-01-01T00:00:00",
        "sess-1; Expires=2026-1-01T00:00:00Z",
        "sess-1; Expires=2026-02-30T00:00:00Z",
        "sess-1; Expires=2026-13-01T00:00:00Z",
        "sess-1; Expires=2026-01-01T24:00:00Z",
        "sess-1; Expires=2026-01-01T00:00:60Z",
        "sess-1; Expires=2026-01-01T00:00:00.5Z",
        "sess-1; Expires=2026-01-01T00:00:00+01:00",
        "sess-1; Expires=\u0662\u0660\u0662\u0666-01-01T00:00:00Z",  # non-ASCII digits
        "sess-1; Expires=Thu, 01 Jan 2026 00:00:00 GMT",
        "sess-1; Expires=tomorrow",
        "sess-1; Expires=2026-01-01T00:00:00Z; Expires=2026-01-02T00:00:00Z",
        "sess-1; Max-Age=60",
        "a" * 257 + "; Expires=2026-01-01T00:00:00Z",
        None,
        12,
        b"sess-1; Expires=2026-01-01T00:00:00Z",
    ],
)
def test_parse_returns_none_when_malformed(value):
    assert parse_session_header(value) is None


def test_parse_accepts_the_longest_id():
    assert parse_session_header("a" * 256 + "; Expires=2026-01-01T00:00:00Z") == ("a" * 256, 1_767_225_600.0)


# --- event framing -----------------------------------------------------------------------------


def test_event_bytes_are_exactly_tgis():
    payload = {"token": {"id": 7, "text": '猫 "x"\n', "special": False}, "generated_text": None}
    text = wire.event(payload)
    assert text == 'data:{"token": {"id": 7, "text": "猫 \\"x\\"\\n", "special": false}, "generated_text": null}\n\n'
    assert text == "data:" + json.dumps(payload, ensure_ascii=False, separators=(", ", ": ")) + "\n\n"
    assert text.count("\n") == 2  # a newline in the text is escaped: one line per event
    assert text.encode().startswith(b'data:{"token": {"id": 7, "text": "\xe7\x8c\xab')  # UTF-8, not \u escapes


def test_error_event():
    assert wire.error_event("boom", "INTERNAL_ERROR") == {"error": "boom", "error_type": "INTERNAL_ERROR"}
    assert wire.event(wire.error_event("device lost", "WORKER_UNAVAILABLE")) == (
        'data:{"error": "device lost", "error_type": "WORKER_UNAVAILABLE"}\n\n'
    )


def test_event_error_reads_an_error_event():
    assert wire.event_error({"error": "boom", "error_type": "WORKER_UNAVAILABLE"}) == ("WORKER_UNAVAILABLE", "boom")
    assert wire.event_error({"error": "boom"}) == ("INTERNAL_ERROR", "boom")
    assert wire.event_error({"error": "boom", "error_type": None}) == ("INTERNAL_ERROR", "boom")
    assert wire.event_error({"token": {"id": 1}, "generated_text": None}) is None


# --- parsing events ----------------------------------------------------------------------------

EVENTS = [
    {"token": {"id": 1, "text": " The", "special": False}, "generated_text": None},
    {"token": {"id": 2, "text": " café 日本 🐱", "special": False}, "generated_text": None},
    {"token": {"id": 3, "text": "", "special": True}, "generated_text": "The café 日本 🐱"},
]


@pytest.mark.parametrize("newline", ["\n\n", "\r\n\r\n"])
def test_events_split_at_every_byte_position(newline):
    text = "".join("data:" + json.dumps(e, ensure_ascii=False) + newline for e in EVENTS).encode()
    text = b": a comment\n" + text
    for cut in range(len(text) + 1):
        assert list(iter_events([text[:cut], text[cut:]])) == EVENTS
    assert list(iter_events([bytes([b]) for b in text])) == EVENTS
    for cut in range(0, len(text), 5):  # three pieces
        assert list(iter_events([text[:cut], text[cut:cut + 11], text[cut + 11:]])) == EVENTS


def test_parser_reads_what_event_writes_split_anywhere():
    stream = "".join(wire.event(e) for e in EVENTS).encode()
    for cut in range(len(stream) + 1):
        parser = EventParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.end() == EVENTS


def test_parser_feed_returns_each_event_once_its_line_is_complete():
    parser = EventParser()
    line = wire.event(EVENTS[0]).encode()
    assert parser.feed(line[:-2]) == []  # no newline yet
    assert parser.feed(line[-2:-1]) == [EVENTS[0]]  # the line's newline completes it
    assert parser.feed(line[-1:]) == []  # the blank line
    assert parser.end() == []


def test_many_events_in_one_buffer():
    stream = "".join(wire.event({"n": n}) for n in range(50)).encode()
    parser = EventParser()
    assert parser.feed(stream) == [{"n": n} for n in range(50)]
    assert parser.end() == []


def test_data_with_and_without_a_space():
    assert list(iter_events([b'data:{"a": 1}\n\ndata: {"a": 2}\n\ndata:  {"a": 3}\n\n'])) == [
        {"a": 1}, {"a": 2}, {"a": 3}
    ]


def test_other_lines_are_skipped():
    text = b': keep-alive\n\nevent: token\nid: 7\nretry: 10\n\ndata:{"a": 1}\n\n\n\n'
    assert list(iter_events([text])) == [{"a": 1}]
    assert list(iter_events([])) == []
    assert list(iter_events([b"", b"\n", b"\r\n", b"   "])) == []


def test_the_last_line_without_a_newline():
    assert list(iter_events([b'data: {"a": 1}'])) == [{"a": 1}]
    assert list(iter_events([b'data: {"a"', b': 1}\r'])) == [{"a": 1}]
    parser = EventParser()
    assert parser.feed(b'data:{"a": 1}') == []
    assert parser.end() == [{"a": 1}]
    assert parser.end() == []


def test_an_error_event_is_an_event():
    stream = (wire.event(EVENTS[0]) + wire.event(wire.error_event("device lost", "WORKER_UNAVAILABLE"))).encode()
    events = list(iter_events([stream[:7], stream[7:]]))
    assert events == [EVENTS[0], {"error": "device lost", "error_type": "WORKER_UNAVAILABLE"}]
    assert wire.event_error(events[-1]) == ("WORKER_UNAVAILABLE", "device lost")


@pytest.mark.parametrize(
    "line",
    [b"data:{not json", b"data:[1, 2]", b'data:"text"', b"data:null", b"data:", b"data:\xff\xfe", b"data:" + b"[" * 100_000],
)
def test_a_data_line_that_is_not_a_json_object_is_malformed(line):
    with pytest.raises(MalformedEvent) as caught:
        list(iter_events([line + b"\n\n"]))
    assert isinstance(caught.value, ValueError)
    with pytest.raises(MalformedEvent):
        EventParser().feed(line + b"\n")


def test_iter_events_yields_the_good_events_before_a_bad_one():
    events = iter_events([b'data:{"a": 1}\n\ndata:{not json\n\n'])
    assert next(events) == {"a": 1}
    with pytest.raises(MalformedEvent, match="not JSON"):
        next(events)
