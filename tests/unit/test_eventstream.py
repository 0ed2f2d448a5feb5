"""The event-stream encoder, checked with botocore's own decoder and its sagemaker-runtime parser."""

from __future__ import annotations

import json
import struct
import zlib

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from llava_sessions.deploy import eventstream


def decode(data: bytes):
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


class _RawStream:
    """What botocore's EventStream reads: an object with stream() yielding byte chunks."""

    def __init__(self, chunks):
        self.chunks = chunks

    def stream(self):
        yield from self.chunks

    def close(self):
        pass


def parse_events(data: bytes, chunk: int = 7):
    """Iterate as boto3's ``response["Body"]`` does, fed in awkward chunk sizes."""
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"]
    parser = EventStreamJSONParser()  # what botocore's rest-json parser uses for event streams
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return EventStream(_RawStream(chunks), shape, parser, "InvokeEndpointWithResponseStream")


def test_message_layout_and_checksums():
    message = eventstream.encode_message({"a": "b"}, b"xyz")
    total, headers_length, prelude_crc = struct.unpack("!III", message[:12])
    assert total == len(message)
    assert headers_length == 1 + 1 + 1 + 2 + 1  # name length, "a", type, value length, "b"
    assert prelude_crc == zlib.crc32(message[:8])
    assert struct.unpack("!I", message[-4:])[0] == zlib.crc32(message[:-4])
    assert message[12:12 + headers_length] == b"\x01a\x07\x00\x01b"
    assert message[12 + headers_length:-4] == b"xyz"


def test_payload_part_decodes_with_botocore():
    [message] = decode(eventstream.payload_part(b"data:{\"token\": 1}\n\n"))
    assert message.headers == {
        ":event-type": "PayloadPart",
        ":content-type": "application/octet-stream",
        ":message-type": "event",
    }
    assert message.payload == b"data:{\"token\": 1}\n\n"


def test_unicode_headers_and_empty_payload():
    [message] = decode(eventstream.encode_message([("é-name", "välue ✓")]))
    assert message.headers == {"é-name": "välue ✓"}
    assert message.payload == b""


def test_a_flipped_bit_is_caught_by_the_checksum():
    data = bytearray(eventstream.payload_part(b"hello"))
    data[-6] ^= 0x01  # inside the payload
    with pytest.raises(ChecksumMismatch):
        decode(bytes(data))


def test_payload_parts_rejoin_exactly_through_the_sagemaker_parser():
    pieces = [b"data:{\"a\": 1}\n\n", "ünïcode split".encode()[:5], "ünïcode split".encode()[5:], b"\x00\xff"]
    stream = b"".join(eventstream.payload_part(p) for p in pieces)
    events = list(parse_events(stream))
    assert events == [{"PayloadPart": {"Bytes": p}} for p in pieces]
    assert b"".join(e["PayloadPart"]["Bytes"] for e in events) == b"".join(pieces)


def test_large_data_is_split_into_parts():
    data = bytes(range(256)) * 100
    parts = eventstream.payload_parts(data, max_part=1000)
    assert len(parts) == 26
    assert b"".join(m.payload for p in parts for m in decode(p)) == data
    assert eventstream.payload_parts(b"") == []


def test_model_stream_error_is_raised_by_botocore_while_iterating():
    stream = eventstream.payload_part(b"first") + eventstream.model_stream_error(
        "connection closed", eventstream.STREAM_BROKEN
    )
    events = iter(parse_events(stream))
    assert next(events) == {"PayloadPart": {"Bytes": b"first"}}
    with pytest.raises(EventStreamError) as caught:
        next(events)
    assert caught.value.response["Error"] == {"Code": "ModelStreamError", "Message": "connection closed"}
    [message] = decode(eventstream.model_stream_error("m", "ModelInvocationTimeExceeded"))
    assert message.headers[":exception-type"] == "ModelStreamError"
    assert json.loads(message.payload) == {"Message": "m", "ErrorCode": "ModelInvocationTimeExceeded"}


def test_internal_stream_failure_and_unmodeled_error():
    with pytest.raises(EventStreamError) as caught:
        list(parse_events(eventstream.internal_stream_failure("oops")))
    assert caught.value.response["Error"] == {"Code": "InternalStreamFailure", "Message": "oops"}
    with pytest.raises(EventStreamError) as caught:
        list(parse_events(eventstream.error_message("SomeCode", "some message")))
    assert caught.value.response["Error"] == {"Code": "SomeCode", "Message": "some message"}


def test_limits_are_enforced():
    with pytest.raises(ValueError):
        eventstream.encode_message({"": "x"})
    with pytest.raises(ValueError):
        eventstream.encode_message({"n" * 256: "x"})
    with pytest.raises(ValueError):
        eventstream.encode_message({"n": "x" * 40000})
    with pytest.raises(ValueError):
        eventstream.payload_part(b"x" * (eventstream.MAX_PAYLOAD_BYTES + 1))
