"""What the in-process probes share: the `small` preset loaded on 2 CPU threads, sessions'
histories prefilled on it, and a median timer."""

import statistics
import tempfile
import time

import torch

from llava_sessions.handler.engine import generation
from llava_sessions.handler.engine.model_loader import LoadedModel, load_model
from llava_sessions.tiny_model import write_tiny_llava


def small_model() -> LoadedModel:
    """The `small` preset (random weights, real geometry) in float32 on 2 CPU threads."""
    torch.set_num_threads(2)
    checkpoint = tempfile.mkdtemp()
    write_tiny_llava(checkpoint, preset="small")
    return load_model(checkpoint, torch.device("cpu"), "float32")


def history(loaded: LoadedModel, n: int, generator: torch.Generator):
    """A session's cache holding ``n`` random tokens' KV."""
    cache = generation.new_cache(loaded)
    generation.prefill(loaded, torch.randint(5, 1000, (1, n), generator=generator), None, cache)
    return cache


def median_ms(call, n: int = 60, warm: int = 5) -> float:
    """Median wall time of ``call()`` in ms over ``n`` calls, after ``warm`` untimed ones."""
    for _ in range(warm):
        call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3
