"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    """The TorchServe adapter, initialised through TorchServe's own Context with the tiny model."""
    from ts.context import Context

    from llava_sessions.handler.torchserve_handler import LlavaSessionHandler

    from llava_sessions.handler import router_hop

    context = Context("llava", "/nonexistent", {}, 1, None, "0.12.0",
                      model_yaml_config={"handler": {"model": str(tiny_model_dir), "session_ttl_s": 60}})
    h = LlavaSessionHandler()
    # As under `serve`: the router's secret in the worker's environment (a fresh one per handler,
    # so each listens on its own cancellation socket).
    with pytest.MonkeyPatch.context() as env:
        env.setenv(router_hop.SECRET_ENV, router_hop.new_secret())
        h.initialize(context)
    yield h
    h.engine.stop()
    h.cancellations.close()
    h.joins.close()


@pytest.fixture
def one_torch_thread():
    """One torch thread: the tiny model gains nothing from more, and loses a lot on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
