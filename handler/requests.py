"""The parsed requests: what a dialect makes of a body, and what the handler runs. Torch-free.

Every dialect (handler/dialects/) parses into these, so the handler runs one flow whatever the
client sent; each request keeps its ``dialect`` to shape the answer the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llava_sessions.handler.dialects.base import Dialect


@dataclass(frozen=True)
class Message:
    """One message of a conversation a chat body carries: ``images`` are raw references."""

    role: str  # "system", "user" or "assistant"
    text: str
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Turn:
    session_id: str  # "" until known: an open's first question, a one-shot answer
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    images: tuple[str, ...]
    stream: bool
    dialect: "Dialect"
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    # The conversation before this message, as a chat body resends it (None: continue the
    # session as it is); the engine keeps what the session already holds of it.
    history: tuple[Message, ...] | None = None
    rewind_to: int | None = None  # answer after the session's first this-many turns
    include_usage: bool = False  # OpenAI's stream_options.include_usage
    details: bool = False  # TGI's parameters.details
    echo_prompt: bool = False  # TGI's parameters.return_full_text
    model: str = ""  # the model name the client sent (OpenAI), echoed in the answer


@dataclass(frozen=True)
class OpenSession:
    images: tuple[str, ...]
    dialect: "Dialect"
    # The first question, answered in the open's reply; its session_id is filled in once opened.
    first_turn: Turn | None = None


@dataclass(frozen=True)
class OneShot:
    """A question with no session: answered, and nothing kept afterwards."""

    turn: Turn

    @property
    def dialect(self) -> "Dialect":
        return self.turn.dialect


@dataclass(frozen=True)
class CloseSession:
    session_id: str
    dialect: "Dialect"


Request = OpenSession | Turn | OneShot | CloseSession
