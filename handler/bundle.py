"""Turn bundles: several client requests in one TorchServe request, and their answers back.

TorchServe's own batching makes a request that finds the worker idle wait ``maxBatchDelay`` for
company, and its batch polling costs a few milliseconds more on top (measured on 2 CPU cores: a
trivial request took 6.3-7.2 ms with batchSize 8 and a 2 ms delay, 2.0-2.9 ms with batchSize 1).
So the model runs with batchSize 1 and the affinity router batches instead: a request for an idle
worker goes straight through, and the requests that arrive while the worker is busy go together
as one bundle as soon as it is free. The handler runs a bundle's turns as one batch, exactly as it
ran a TorchServe batch.

Request (router to handler): header ``X-Llava-Sessions-Bundle: <members>``, body the members in
order, each ``u32 head length | head JSON {"headers": {...}} | u32 body length | body``.

Answer (handler to router): frames ``u32 member | u8 kind | u32 length | payload``. A member's
answer is a HEAD frame (JSON: status, headers, content type), DATA frames (its body, or a token
stream's events as they are generated) and an END frame. Frames of different members interleave;
a member whose turn ends while others still run is answered then, in a chunk of its own.

Torch-free: the router imports it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping

from llava_sessions.errors import InvalidRequest

BUNDLE_HEADER = "X-Llava-Sessions-Bundle"
CONTENT_TYPE = "application/x-llava-sessions-bundle"

HEAD, DATA, END = 1, 2, 3
_LENGTH = struct.Struct(">I")
_FRAME = struct.Struct(">IBI")  # member, kind, payload length


# --- request ------------------------------------------------------------------------


def encode_request(members: Iterable[tuple[Mapping[str, str], bytes]]) -> bytes:
    parts = []
    for headers, body in members:
        head = json.dumps({"headers": dict(headers)}).encode()
        parts += [_LENGTH.pack(len(head)), head, _LENGTH.pack(len(body)), body]
    return b"".join(parts)


def decode_request(body: bytes, expected: int) -> list[tuple[dict[str, str], bytes]]:
    """The members of a bundle body; InvalidRequest if it is not ``expected`` well-formed members."""
    members, view, offset = [], memoryview(body), 0
    while offset < len(view):
        head, offset = _take(view, offset)
        payload, offset = _take(view, offset)
        try:
            headers = json.loads(bytes(head))["headers"]
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"malformed bundle member head: {exc}") from None
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise InvalidRequest("malformed bundle member head: headers must map names to strings")
        members.append((headers, bytes(payload)))
    if len(members) != expected:
        raise InvalidRequest(f"the bundle announced {expected} members and holds {len(members)}")
    return members


def _take(view: memoryview, offset: int) -> tuple[memoryview, int]:
    if offset + _LENGTH.size > len(view):
        raise InvalidRequest("truncated bundle body")
    (length,) = _LENGTH.unpack_from(view, offset)
    start = offset + _LENGTH.size
    if start + length > len(view):
        raise InvalidRequest("truncated bundle body")
    return view[start : start + length], start + length


def member_count(headers: Mapping) -> int | None:
    """The announced member count when ``headers`` mark a bundle, else None."""
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == BUNDLE_HEADER.lower() and isinstance(value, str):
            if not value.strip().isdigit() or int(value) < 1:
                raise InvalidRequest(f"{BUNDLE_HEADER} must be a positive member count, got {value[:20]!r}")
            return int(value)
    return None


# --- answer ---------------------------------------------------------------------------


def frame(member: int, kind: int, payload: bytes | str = b"") -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    return _FRAME.pack(member, kind, len(data)) + data


def head_frame(member: int, status: int, headers: Mapping[str, str], content_type: str) -> bytes:
    head = {"status": status, "headers": dict(headers), "content_type": content_type}
    return frame(member, HEAD, json.dumps(head))


@dataclass(frozen=True)
class Frame:
    member: int
    kind: int
    payload: bytes

    def head(self) -> tuple[int, dict[str, str], str]:
        """(status, headers, content type) of a HEAD frame."""
        head = json.loads(self.payload)
        return int(head["status"]), dict(head["headers"]), str(head["content_type"])


class FrameReader:
    """Frames out of a byte stream cut anywhere (HTTP chunks need not align with frames)."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames, offset = [], 0
        while len(self._buffer) - offset >= _FRAME.size:
            member, kind, length = _FRAME.unpack_from(self._buffer, offset)
            end = offset + _FRAME.size + length
            if end > len(self._buffer):
                break
            frames.append(Frame(member, kind, bytes(self._buffer[offset + _FRAME.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buffer)
