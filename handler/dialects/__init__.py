"""Payload dialects: one object per way of asking (native, AWS sample, TGI, OpenAI).

Each turns a body into the handler's requests (handler/requests.py) and shapes the answer, a
stream event and an error. Adding a dialect means adding one object to ``DIALECTS``.
"""

from __future__ import annotations

from llava_sessions.errors import InvalidRequest
from llava_sessions.handler.dialects.aws_sample import AWS_SAMPLE
from llava_sessions.handler.dialects.base import Dialect
from llava_sessions.handler.dialects.fields import DIALECT_MARKERS
from llava_sessions.handler.dialects.native import NATIVE
from llava_sessions.handler.dialects.openai import OPENAI
from llava_sessions.handler.dialects.tgi import TGI

# In the order they are tried: the first that recognises a body parses it.
DIALECTS: tuple[Dialect, ...] = (AWS_SAMPLE, OPENAI, TGI, NATIVE)
BY_NAME = {dialect.name: dialect for dialect in DIALECTS}


def recognise(payload: dict, hint: str | None = None) -> Dialect:
    """The dialect of a body: ``hint`` when the route says it (``/v1/chat/completions``), else the
    first whose marker field the body has. None fits: an error naming each dialect's marker."""
    if hint is not None:
        return BY_NAME[hint]
    for dialect in DIALECTS:
        if dialect.recognises(payload):
            return dialect
    keys = ", ".join(sorted(repr(k)[:40] for k in payload)[:5]) or "none"
    raise InvalidRequest(f"this body matches no payload dialect (its fields: {keys}); send one of: {DIALECT_MARKERS}")


__all__ = ["AWS_SAMPLE", "DIALECTS", "Dialect", "NATIVE", "OPENAI", "TGI", "recognise"]
