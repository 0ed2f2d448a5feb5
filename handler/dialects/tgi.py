"""Text Generation Inference's payload, as the SageMaker TGI and LMI containers take it (and
the seed articles send it): ``{"inputs": ..., "parameters": {...}, "stream": ...}``.

``inputs`` is the user's message; the server applies the model's chat template, since a session
holds a conversation (a prompt already written in a template's format would be framed twice).
Images come inline as TGI takes them for vision models, markdown ``![](<data URL or allowed
https/s3 URL>)``, and go before the text. ``parameters``: ``max_new_tokens``, ``temperature``,
``top_p``, ``top_k``, ``repetition_penalty``, ``do_sample`` (false: greedy whatever the
temperature; true without a temperature: 1.0), ``stop``, ``details``, ``return_full_text``
(the question before the answer). The answer is TGI's list, ``[{"generated_text": ...}]``; a
stream is TGI's events. Errors are TGI's ``{"error": ..., "error_type": <our code>}``.
"""

from __future__ import annotations

import re

from llava_sessions import wire
from llava_sessions.errors import InvalidRequest, SessionsError
from llava_sessions.handler.dialects import fields
from llava_sessions.handler.dialects.base import Dialect, by_session, tgi_finish_reason
from llava_sessions.handler.requests import Request, Turn
from llava_sessions.wire import NEW_SESSION

_FIELDS = ("inputs", "parameters", "stream")
_PARAMETERS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "stop",
               "details", "return_full_text")
# ![alt](url): the url runs to the closing parenthesis (base64 and URLs hold none).
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


class Tgi(Dialect):
    name = "tgi"

    def recognises(self, payload: dict) -> bool:
        return "inputs" in payload

    def parse(self, payload: dict, header: str | None, config) -> Request:
        fields.check_fields(payload, _FIELDS, "TGI")
        parameters = payload.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"'parameters' must be an object, got {fields.type_name(parameters)}")
        fields.check_fields(parameters, _PARAMETERS, "TGI parameters")
        inputs = fields.text(payload.get("inputs"), "inputs", config)
        images = fields.checked_image_count(
            tuple(fields.image_ref(m.group(1), "a markdown image in 'inputs'") for m in _MARKDOWN_IMAGE.finditer(inputs)),
            config,
        )
        prompt = _MARKDOWN_IMAGE.sub("", inputs).strip() if images else inputs
        if not prompt:
            raise InvalidRequest("'inputs' holds images but no question; add the user's message after them")
        turn = Turn(
            session_id="" if header in (None, NEW_SESSION) else header,
            prompt=prompt,
            max_new_tokens=fields.max_new_tokens(parameters.get("max_new_tokens", config.default_max_new_tokens),
                                                 config, "parameters.max_new_tokens"),
            temperature=_temperature(parameters),
            top_p=fields.top_p(fields.given(parameters.get("top_p"), 1.0)),
            images=images,
            stream=fields.flag(fields.given(payload.get("stream"), False), "stream"),
            dialect=self,
            top_k=fields.top_k(fields.given(parameters.get("top_k"), 0)),
            repetition_penalty=fields.repetition_penalty(fields.given(parameters.get("repetition_penalty"), 1.0)),
            stop=fields.stops(parameters.get("stop"), "parameters.stop"),
            details=fields.flag(fields.given(parameters.get("details"), False), "parameters.details"),
            echo_prompt=fields.flag(fields.given(parameters.get("return_full_text"), False), "parameters.return_full_text"),
        )
        return by_session(turn, header)

    def open_body(self, session_id: str, expires_at: float, first, turn) -> list:
        return self.turn_body(first, turn)  # the session's id travels in the header

    def turn_body(self, result, turn) -> list:
        text = result.text
        if turn is not None and turn.echo_prompt:
            text = turn.prompt + text
        answer: dict = {"generated_text": text}
        if turn is not None and turn.details:
            answer["details"] = {
                "finish_reason": tgi_finish_reason(result),
                "generated_tokens": result.completion_tokens,
                "seed": None,
            }
        return [answer]

    def error_body(self, error: SessionsError, status: int) -> dict:
        return wire.error_event(error.message, error.code)


def _temperature(parameters: dict) -> float:
    do_sample = parameters.get("do_sample")
    if do_sample is not None:
        fields.flag(do_sample, "parameters.do_sample")
    if do_sample is False:
        return 0.0  # greedy, as TGI decodes without sampling
    value = parameters.get("temperature")
    if value is None:
        return 1.0 if do_sample else 0.0
    return fields.temperature(value)


TGI = Tgi()
