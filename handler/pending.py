"""One request of a TorchServe batch on its way through the handler's hooks.

Its own module because TorchServe wants exactly one class in the handler module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PendingRequest:
    idx: int  # its place in the batch (TorchServe's request index)
    member: int | None = None  # its place in that request, when the request is a bundle
    request: Any = None  # a handler/requests.py request, once parsed
    stream: Any = None  # streaming.TokenStream of a streamed turn
    turn: Any = None  # the engine's TurnRequest, for a turn (a one-shot's too)
    outcome: Any = None  # the engine's TurnResult or exception, once it ran
    hop: Any = None  # router_hop.Hop: its id at the router, when the router received it
    reply: Any = None  # replies.Reply, set once it is answered
    sink: Any = None  # a bundle member's streaming.BundleMemberSink: its frames' way out
    sent: bool = False  # a bundle member answered before its batch's end (its turn ended first)
