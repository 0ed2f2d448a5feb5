"""``llava-sessions bench --workers-scaling``: what a second CPU worker adds to aggregate throughput.

Each configuration is a real serving stack (``llava-sessions serve``) in a process of its own,
loaded over loopback HTTP by ``sessions`` clients at once, in two workloads:

- **cold opens**: each client opens a session with the bench image and its first question in one
  request (the vision tower and a full prefill each: work one worker does one request at a time),
  then closes it; opens per second over the round's wall time;
- **follow-up turns**: each client opens a session (untimed), then asks ``turns`` questions of
  ``max_new_tokens`` greedy tokens (mostly decoding, which one worker batches across its
  sessions); every turn's completion tokens over the round's wall time.

Each stack runs ``repeats`` rounds of each (fresh sessions each); the median round counts.

The configurations, in one run so their ratios share the machine's state:

- ``one worker``: every core;
- ``two workers``: each with its share of the cores (the cores divided by the workers), the default;
- ``two workers, every core each``: torch's own default, where the two fight over the cores.

Torch-free: the stacks run in child processes.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llava_sessions.bench.served import Client, ServerError, StackProcess
from llava_sessions.wire import CLOSE, NEW_SESSION

QUESTIONS = [
    "What is in the picture?",
    "Describe the colours you can see.",
    "Is there anything on the left side?",
    "What is at the top?",
    "Sum it up in one sentence.",
]


@dataclass
class Options:
    preset: str = "small"
    model: str | None = None
    sessions: int = 4
    turns: int = 3
    max_new_tokens: int = 24
    repeats: int = 3
    device: str = "cpu"

    def command(self) -> str:
        parts = ["llava-sessions", "bench", "--workers-scaling", "--preset", self.preset]
        if self.model:
            parts += ["--model", self.model]
        parts += ["--concurrency", str(self.sessions), "--turns", str(self.turns),
                  "--max-new-tokens", str(self.max_new_tokens), "--repeats", str(self.repeats)]
        return shlex.join(parts)


def configurations(cores: int) -> list[dict]:
    return [
        {"name": "one worker", "workers": 1, "cpu_threads": cores},
        {"name": "two workers", "workers": 2, "cpu_threads": max(1, cores // 2)},
        {"name": "two workers, every core each", "workers": 2, "cpu_threads": cores},
    ]


def run(options: Options, log=print) -> dict:
    from llava_sessions.bench.runner import bench_image_b64, checkpoint_for
    from llava_sessions.bench.runner import Options as BenchOptions

    if options.sessions < 1 or options.turns < 1 or options.repeats < 1:
        raise ValueError("sessions, turns and repeats must be at least 1")
    model_dir = checkpoint_for(BenchOptions(preset=options.preset, model=options.model))
    image = bench_image_b64()
    cores = len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(prefix="llava-bench-workers-") as tmp:
        for index, config in enumerate(configurations(cores)):
            log(f"{config['name']}: starting {config['workers']} worker(s), {config['cpu_threads']} thread(s) each")
            stack = StackProcess(model_dir, Path(tmp) / f"stack-{index}", options.device,
                                 workers=config["workers"], cpu_threads=config["cpu_threads"])
            with stack:
                client = Client(stack.url)
                _turns_round(client, image, options, sessions=1)  # warm-up: first forwards, allocator
                _opens_round(client, image, options, sessions=1)
                turns = [_turns_round(client, image, options, options.sessions) for _ in range(options.repeats)]
                opens = [_opens_round(client, image, options, options.sessions) for _ in range(options.repeats)]
            result = {**config, "turn_rounds": turns, "open_rounds": opens,
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in turns),
                      "opens_per_s": statistics.median(r["opens_per_s"] for r in opens)}
            results.append(result)
            log(f"{config['name']}: follow-ups {result['tokens_per_s']:.1f} tokens/s, cold opens "
                f"{result['opens_per_s']:.2f}/s (medians of {options.repeats} rounds)")
    one = results[0]
    return {
        "command": options.command(),
        "cores": cores,
        "sessions": options.sessions,
        "turns": options.turns,
        "max_new_tokens": options.max_new_tokens,
        "configurations": results,
        "ratios": {
            "cold_opens_two_workers_over_one": results[1]["opens_per_s"] / one["opens_per_s"],
            "cold_opens_two_workers_every_core_over_one": results[2]["opens_per_s"] / one["opens_per_s"],
            "follow_ups_two_workers_over_one": results[1]["tokens_per_s"] / one["tokens_per_s"],
            "follow_ups_two_workers_every_core_over_one": results[2]["tokens_per_s"] / one["tokens_per_s"],
        },
    }


def _opens_round(client: Client, image: str, options: Options, sessions: int) -> dict:
    """``sessions`` clients at once, each opening with the image and its first question, then closing."""

    def cold_open(index: int) -> None:
        body = {"requestType": NEW_SESSION, "images": [image], "prompt": QUESTIONS[0],
                "max_new_tokens": options.max_new_tokens}
        _, status, payload = client.send(body)
        if status != 200:
            raise ServerError(f"HTTP {status}: {payload[:300].decode('utf-8', errors='replace')}")
        client.send({"requestType": CLOSE}, json.loads(payload)["session_id"])

    with ThreadPoolExecutor(sessions) as pool:
        started = time.perf_counter()
        list(pool.map(cold_open, range(sessions)))
        seconds = time.perf_counter() - started
    return {"opens": sessions, "seconds": seconds, "opens_per_s": sessions / seconds}


def _turns_round(client: Client, image: str, options: Options, sessions: int) -> dict:
    """``sessions`` conversations at once: opened first (untimed), then their turns, timed together."""
    with ThreadPoolExecutor(sessions) as pool:
        ids = [session_id for _, session_id in pool.map(lambda _: client.open(image), range(sessions))]
        started = time.perf_counter()
        per_session = list(pool.map(lambda sid: _conversation(client, sid, options), ids))
        seconds = time.perf_counter() - started
        list(pool.map(lambda sid: client.send({"requestType": CLOSE}, sid), ids))
    tokens = sum(tokens for tokens, _ in per_session)
    turn_seconds = [s for _, times in per_session for s in times]
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "turn_median_s": statistics.median(turn_seconds)}


def _conversation(client: Client, session_id: str, options: Options) -> tuple[int, list[float]]:
    tokens, times = 0, []
    for turn in range(options.turns):
        body = {"prompt": QUESTIONS[turn % len(QUESTIONS)], "max_new_tokens": options.max_new_tokens}
        elapsed, status, payload = client.send(body, session_id)
        if status != 200:
            raise ServerError(f"HTTP {status}: {payload[:300].decode('utf-8', errors='replace')}")
        tokens += json.loads(payload)["usage"]["completion_tokens"]
        times.append(elapsed)
    return tokens, times


def table(result: dict) -> str:
    lines = [f"{result['sessions']} clients at once; follow-ups: {result['turns']} turns x "
             f"{result['max_new_tokens']} tokens; on {result['cores']} cores",
             "| configuration | workers | threads each | cold opens/s | ÷ one | follow-up tokens/s | ÷ one |",
             "|---|---|---|---|---|---|---|"]
    one = result["configurations"][0]
    for config in result["configurations"]:
        lines.append(f"| {config['name']} | {config['workers']} | {config['cpu_threads']} | "
                     f"{config['opens_per_s']:.2f} | {config['opens_per_s'] / one['opens_per_s']:.2f} | "
                     f"{config['tokens_per_s']:.1f} | {config['tokens_per_s'] / one['tokens_per_s']:.2f} |")
    lines.append(f"command: {result['command']}")
    return "\n".join(lines)
