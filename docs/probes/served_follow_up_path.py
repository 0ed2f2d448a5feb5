"""Served (`serve` stack in a process of its own, one worker, the `small` preset, compiled): where a
one-token follow-up's time goes. Follow-ups alternate between the router and TorchServe's own
endpoint for the worker (the router's hop skipped), on the same session; a trivial request (the
close of an unknown session, answered 404 by the handler) times TorchServe's round trip alone.
Then, with the stack stopped, the same follow-ups in process through `SessionEngine.turn`.
Usage:
    .venv/bin/python docs/probes/served_follow_up_path.py"""

import io
import statistics
import time
from pathlib import Path

from _served import noise_jpeg, served_stack


def main() -> None:
    from PIL import Image

    jpeg, image = noise_jpeg()
    times: dict[str, list[float]] = {"router": [], "straight to TorchServe": [], "trivial, straight": []}
    with served_stack() as (router, worker, work):
        for _ in range(2):  # two conversations of 30 follow-ups (histories of ~650-1,400 tokens)
            _, _, header = router.post({"requestType": "NEW_SESSION", "images": [image]}, "NEW_SESSION")
            session = header.split(";")[0]
            router.post({"prompt": "What is in the picture?", "max_new_tokens": 8}, session)
            for k in range(30):
                endpoint, name = (router, "router") if k % 2 else (worker, "straight to TorchServe")
                seconds, status, _ = endpoint.post({"prompt": f"Tell me more about part {k % 5} of it.",
                                                    "max_new_tokens": 1}, session)
                assert status == 200
                times[name].append(seconds)
                seconds, status, _ = worker.post({"requestType": "CLOSE"}, "no-such-session-0123456789abcdef")
                assert status == 404
                times["trivial, straight"].append(seconds)
            router.post({"requestType": "CLOSE"}, session)
    times["in process, engine.turn"] = in_process(work / "model", Image.open(io.BytesIO(jpeg)))
    for name, samples in times.items():
        print(f"{name:24s} {statistics.median(samples) * 1e3:6.2f} ms (median of {len(samples)})")


def in_process(model: Path, image) -> list[float]:
    import torch

    from llava_sessions.config import ServingConfig
    from llava_sessions.handler.engine.engine import SessionEngine
    from llava_sessions.handler.engine.generation import SamplingParams
    from llava_sessions.handler.engine.model_loader import load_model

    torch.set_num_threads(2)
    engine = SessionEngine(load_model(str(model), torch.device("cpu"), "float32"), ServingConfig(compile="on"))
    engine.warm_up()
    times = []
    for _ in range(2):
        session = engine.open_session([image]).session_id
        engine.turn(session, "What is in the picture?", SamplingParams(8))
        for k in range(30):
            started = time.perf_counter()
            engine.turn(session, f"Tell me more about part {k % 5} of it.", SamplingParams(1))
            times.append(time.perf_counter() - started)
        engine.close_session(session)
    return times


if __name__ == "__main__":
    main()
