"""The session handler of tests/integration/test_faults.py: the real one, except that a turn whose
prompt starts with "stall" stops answering after its second token (the worker is busy, as in a
long prefill), for ``STALL_S`` seconds.

This file is the archive's handler entry (``build_archive(handler_file=...)``): TorchServe imports
it from the archive, so it imports installed packages only and defines exactly one class. The test
module imports it too, so a renamed import or attribute fails there, loudly, before any TorchServe
starts. It goes through public surfaces only: the engine's ``turns`` and TurnRequest's ``on_token``.
"""

import dataclasses
import time

from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

STALL_PREFIX = "stall"
STALL_S = 60


class StallingHandler(LlavaSessionHandler):
    def initialize(self, context):
        super().initialize(context)
        turns = self.engine.turns  # what run_batch calls with the batch's TurnRequests

        def stalling_turns(requests, joiners=None):
            return turns([stalling(request) if request.prompt.startswith(STALL_PREFIX) else request
                          for request in requests], joiners)

        self.engine.turns = stalling_turns


def stalling(request):
    """The TurnRequest with an ``on_token`` that, once its second token is sent and the turn goes on,
    sleeps: the engine picks no third token for ``STALL_S`` seconds."""
    forward, sent = request.on_token, []

    def on_token(token, last):
        if forward is not None:
            forward(token, last)
        sent.append(token)
        if len(sent) == 2 and not last:
            time.sleep(STALL_S)

    return dataclasses.replace(request, on_token=on_token)
