"""The requests sent to join a running bundle, as the engine's joiners (engine api.Joiners).

The router sends a request for a busy worker out of band, tagged with the running bundle and its
member index there (router_hop.JoinListener). While the bundle's turns decode, the engine asks
for arrivals at every step's end: each becomes a bundle member like the others (its frames go in
the bundle's answer) when it is a follow-up turn with nothing to read first; anything else, and
any turn the engine declines, is dropped without a frame, and the router sends it with the next
bundle, where it gets its usual answer.

Its own module because TorchServe wants exactly one class in the handler module.
"""

from __future__ import annotations

from typing import Callable

from llava_sessions.handler import router_hop, streaming
from llava_sessions.handler.pending import PendingRequest

# (the member's PendingRequest, its joiner): True when it was made ready to run as a turn.
Prepare = Callable[[PendingRequest, router_hop.Joiner], bool]


class BundleJoiners:
    def __init__(self, listener: router_hop.JoinListener, bundle_id: str, idx: int,
                 row_sink: streaming.TorchServeSink, prepare: Prepare, members: list[PendingRequest]):
        """``members``: the batch's requests; a joiner the engine takes is added to them."""
        self._listener, self._bundle_id, self._idx = listener, bundle_id, idx
        self._row_sink, self._prepare, self._members = row_sink, prepare, members
        self._by_turn: dict[int, PendingRequest] = {}

    def arrivals(self) -> list:
        turns = []
        for joiner in self._listener.take(self._bundle_id):
            item = PendingRequest(self._idx, joiner.member,
                                  sink=streaming.BundleMemberSink(self._row_sink, joiner.member))
            if self._prepare(item, joiner):
                self._members.append(item)
                self._by_turn[id(item.turn)] = item
                turns.append(item.turn)
        return turns

    def declined(self, request) -> None:
        item = self._by_turn.pop(id(request), None)
        if item is not None:
            self._members.remove(item)

    def end(self) -> None:
        """The bundle is over: joiners that come for it now are dropped (the router resends them)."""
        self._listener.end(self._bundle_id)
