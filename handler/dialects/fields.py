"""Field checks every dialect shares: a value in, the checked value out, or an InvalidRequest
whose message names the field and what it takes. Torch-free."""

from __future__ import annotations

from typing import Any

from llava_sessions.config import ENV_PREFIX, ServingConfig
from llava_sessions.errors import InvalidRequest, PromptTooLong, TooManyImages

MAX_TEMPERATURE = 2.0
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_TOP_K = 1000
MAX_REPETITION_PENALTY = 10.0


# Another dialect's name for a field: what to send instead, where this dialect has it.
_SAME_AS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "max_new_tokens": "max_tokens",
    "text": "prompt", "question": "prompt", "inputs": "prompt", "prompt_text": "prompt", "image": "images",
    "image_url": "images", "path": "images",
}
DIALECT_MARKERS = (
    'native {"prompt": ...} or {"requestType": "NEW_SESSION"|"CLOSE"}, OpenAI {"messages": [...]}, '
    'TGI {"inputs": ..., "parameters": {...}}, the AWS sample {"type": ...}'
)


def given(value: Any, default: Any) -> Any:
    """A field's value, or ``default`` when absent or null (OpenAI and TGI clients send null for
    "not given")."""
    return default if value is None else value


def check_fields(payload: dict, allowed: tuple[str, ...], kind: str) -> None:
    """Refuse fields the request does not take, naming what to send instead and the dialects (a
    field of another dialect usually means the body was read as the wrong one)."""
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        names = ", ".join(short(name) for name in unknown[:5])
        hints = [f"{short(name)} -> {_SAME_AS[name]!r}" for name in unknown[:5] if _SAME_AS.get(name) in allowed]
        instead = f" (send {', '.join(hints)})" if hints else ""
        raise InvalidRequest(
            f"unknown field(s) {names} in a {kind} request{instead}; allowed: {', '.join(allowed)}. "
            f"The dialects are recognised by their fields: {DIALECT_MARKERS}"
        )


def text(value: Any, field: str, config: ServingConfig, allow_empty: bool = False) -> str:
    """A message's text: a string within max_prompt_chars, valid Unicode."""
    if value is None:
        raise InvalidRequest(f"'{field}' is missing; send the user's message as a string")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field}' must be a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise InvalidRequest(f"'{field}' is empty; send the user's message")
    if len(value) > config.max_prompt_chars:
        raise PromptTooLong(
            f"'{field}' has {len(value)} characters, over the limit of {config.max_prompt_chars}; "
            f"send a shorter prompt or raise {ENV_PREFIX}MAX_PROMPT_CHARS"
        )
    # A lone UTF-16 surrogate ("\ud800") parses but cannot be tokenised.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{field}' holds an unpaired surrogate escape; send valid Unicode text") from None
    return value


def max_new_tokens(value: Any, config: ServingConfig, field: str = "max_new_tokens") -> int:
    limit = config.max_new_tokens_limit
    # bool is an int subclass; true is not a token count.
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise InvalidRequest(f"{field} must be an integer from 1 to {limit}, got {short(value)}")
    return value


def temperature(value: Any) -> float:
    if not is_number(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {short(value)}"
        )
    return float(value)


def top_p(value: Any) -> float:
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise InvalidRequest(f"top_p must be a number greater than 0 and at most 1, got {short(value)}")
    return float(value)


def top_k(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be an integer from 0 (off) to {MAX_TOP_K}, got {short(value)}")
    return value


def repetition_penalty(value: Any) -> float:
    if not is_number(value) or not 0.0 < value <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(
            f"repetition_penalty must be a number greater than 0 and at most {MAX_REPETITION_PENALTY:g} "
            f"(1 is off), got {short(value)}"
        )
    return float(value)


def stops(value: Any, field: str = "stop") -> tuple[str, ...]:
    """Stop strings: one string or a list of at most MAX_STOPS non-empty strings."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise InvalidRequest(f"'{field}' must be a non-empty string or a list of them, got {short(value)}")
    if len(values) > MAX_STOPS or any(len(v) > MAX_STOP_CHARS for v in values):
        raise InvalidRequest(
            f"'{field}' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each"
        )
    return tuple(dict.fromkeys(values))


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{field} must be true or false, got {short(value)}")
    return value


def image_refs(value: Any, config: ServingConfig) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'images' must be a list of image strings, got {type_name(value)}")
    refs = tuple(image_ref(item, "each entry of 'images'") for item in value)
    return checked_image_count(refs, config)


def checked_image_count(refs: tuple[str, ...], config: ServingConfig) -> tuple[str, ...]:
    if len(refs) > config.max_images_per_session:
        raise TooManyImages(
            f"{len(refs)} images sent, at most {config.max_images_per_session} are allowed per session; "
            f"send fewer or raise {ENV_PREFIX}MAX_IMAGES_PER_SESSION"
        )
    return refs


def image_ref(value: Any, what: str) -> str:
    """An image reference stays a raw string; image_sources decodes it."""
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else type_name(value)
        raise InvalidRequest(
            f"{what} must be a non-empty string (base64, a data: URL, an s3:// or https:// URL), got {got}"
        )
    return value


def is_number(value: Any) -> bool:
    # Parsed floats are finite already (protocol.py refuses NaN and overflow); bool is no number here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def short(value: Any) -> str:
    """A value for an error message, cut so a client cannot make our errors (and logs) huge."""
    if isinstance(value, (dict, list)):
        return type_name(value)
    text_ = repr(value)
    return text_ if len(text_) <= 64 else text_[:61] + "..."
