"""AWS event-stream messages, as ``InvokeEndpointWithResponseStream`` sends them. Torch-free.

The binary framing (``application/vnd.amazon.eventstream``) that botocore's ``EventStream``
decodes, one message per event::

    total length (uint32) | headers length (uint32) | CRC32 of those 8 bytes (uint32)
    headers               | payload                 | CRC32 of everything before (uint32)

All integers are big-endian. Each header is: name length (uint8), name (UTF-8), value type
(uint8; 7 = string), value length (uint16), value (UTF-8). Only string headers are needed here.

The sagemaker-runtime service model (botocore ``sagemaker-runtime/2017-05-13``) names the
events: ``ResponseStream`` is a union of ``PayloadPart`` (an event whose payload is the raw
bytes) and two exceptions, ``ModelStreamError`` (members ``Message`` and ``ErrorCode``) and
``InternalStreamFailure`` (``Message``). botocore raises ``EventStreamError`` when it reads a
message of ``:message-type`` ``exception`` (``:exception-type`` names the member, the payload is
its JSON) or ``error`` (``:error-code`` / ``:error-message`` headers).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "application/vnd.amazon.eventstream"

_PRELUDE = struct.Struct("!II")
_UINT32 = struct.Struct("!I")
_STRING_TYPE = 7
_MAX_HEADER_NAME = 255
_MAX_HEADER_VALUE = 2**15 - 1  # signed 16-bit on the wire in some decoders
# botocore's decoder limits (eventstream._MAX_HEADERS_LENGTH / _MAX_PAYLOAD_LENGTH).
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024

# ModelStreamError codes the runtime API documents.
STREAM_BROKEN = "StreamBroken"
MODEL_INVOCATION_TIME_EXCEEDED = "ModelInvocationTimeExceeded"


def encode_message(headers: Mapping[str, str] | Iterable[tuple[str, str]], payload: bytes = b"") -> bytes:
    """One event-stream message with string-valued ``headers`` (kept in the given order)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    encoded_headers = b"".join(_encode_header(name, value) for name, value in items)
    if len(encoded_headers) > MAX_HEADERS_BYTES:
        raise ValueError(f"event headers are {len(encoded_headers)} bytes, over {MAX_HEADERS_BYTES}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"event payload is {len(payload)} bytes, over {MAX_PAYLOAD_BYTES}")
    total = _PRELUDE.size + _UINT32.size + len(encoded_headers) + len(payload) + _UINT32.size
    prelude = _PRELUDE.pack(total, len(encoded_headers))
    head = prelude + _UINT32.pack(_crc(prelude))
    body = head + encoded_headers + payload
    return body + _UINT32.pack(_crc(body))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data`` as is (botocore: ``{"PayloadPart": {"Bytes": data}}``)."""
    return encode_message(
        (
            (":event-type", "PayloadPart"),
            (":content-type", "application/octet-stream"),
            (":message-type", "event"),
        ),
        data,
    )


def payload_parts(data: bytes, max_part: int = MAX_PAYLOAD_BYTES) -> list[bytes]:
    """``data`` as one or more PayloadPart events, none over ``max_part`` bytes; none for no data."""
    return [payload_part(data[start:start + max_part]) for start in range(0, len(data), max_part)]


def exception_event(exception_type: str, message: str, **members: str) -> bytes:
    """A modeled exception event: botocore raises ``EventStreamError`` with Code ``exception_type``."""
    body = {"Message": message, **members}
    return encode_message(
        (
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ),
        json.dumps(body).encode(),
    )


def model_stream_error(message: str, error_code: str = STREAM_BROKEN) -> bytes:
    """The model's response broke off (``StreamBroken``) or took too long (``ModelInvocationTimeExceeded``)."""
    return exception_event("ModelStreamError", message, ErrorCode=error_code)


def internal_stream_failure(message: str) -> bytes:
    """The stream failed on the service's side, not the model's."""
    return exception_event("InternalStreamFailure", message)


def error_message(code: str, message: str) -> bytes:
    """An unmodeled ``error`` message (``:error-code`` / ``:error-message`` headers, no payload)."""
    return encode_message(
        (
            (":error-code", code),
            (":error-message", message),
            (":message-type", "error"),
        )
    )


def _encode_header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode("utf-8"), str(value).encode("utf-8")
    if not 0 < len(raw_name) <= _MAX_HEADER_NAME:
        raise ValueError(f"event header name {name!r} must be 1 to {_MAX_HEADER_NAME} bytes")
    if len(raw_value) > _MAX_HEADER_VALUE:
        raise ValueError(f"event header {name!r} value is over {_MAX_HEADER_VALUE} bytes")
    return (
        struct.pack("!B", len(raw_name)) + raw_name
        + struct.pack("!BH", _STRING_TYPE, len(raw_value)) + raw_value
    )


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF
