"""Strategy (a): our real serving stack (archive, TorchServe with one worker, router) over HTTP.

Torch-free. A server turn always appends its own answer to the session's history, so a turn
sent with max_new_tokens=1 (to time TTFT) leaves that session off the reference history. Each
TTFT probe therefore gets its own session: session S_k replays turns 1..k-1 in full (timed too:
those are the full turns for the decode rate, and their answers must equal the reference), then
sends turn k with max_new_tokens=1. One more session replays all K turns in full. Turn 1 is
timed as a cold open (``cold_open``): one request opens the session with the image and asks.
And one session streams all K turns in full (``"stream": true``), timing each turn's first
event: the TTFT a chat client sees while the answer keeps coming. ``conversation`` replays a
planned conversation in one session (the long conversation): its later images travel with their
turns' requests (``"images"`` on a turn), and its last turns, one token each, are the probes.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llava_sessions import wire
from llava_sessions.wire import CLOSE, NEW_SESSION, SESSION_HEADER


class ServerError(RuntimeError):
    pass


@dataclass
class TurnSample:
    seconds: float
    token_ids: list[int] | None  # None: the server does not return ids; compared by text
    text: str
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    first_event_seconds: float | None = None  # streamed turns: until the first event was read


@dataclass
class ServedSamples:
    """Raw timings of one repeat; indices are 0-based turns."""

    open_s: list[float] = field(default_factory=list)  # image-only opens of S_2..
    cold: list[TurnSample] = field(default_factory=list)  # turn 1: cold opens (the runner's pairs)
    probe: dict[int, TurnSample] = field(default_factory=dict)  # turns 2..K
    full: dict[int, list[TurnSample]] = field(default_factory=dict)
    streamed: dict[int, TurnSample] = field(default_factory=dict)  # turns 1..K of the streamed session

    def probes(self, k: int) -> list[TurnSample]:
        """Turn k's TTFT samples: the cold opens for the first turn, the one probe for the others."""
        return self.cold if k == 0 else [self.probe[k]]


class Client:
    """The bench's HTTP client: one keep-alive ``http.client`` connection per thread.

    What it times is the server's: ``requests`` spends about 1.1 ms of client CPU on each call on
    2 CPU cores (measured against the same router, a tenth of a follow-up turn there) where this
    spends about 0.2 ms, and eight client threads sending at once reach the server closer together.
    """

    def __init__(self, url: str, timeout: float = 600.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the bench talks plain HTTP to a host; got {url!r}")
        self.url = url
        self.timeout = timeout
        self._address = (parts.hostname, parts.port or 80)
        self._path = parts.path.rstrip("/") + "/invocations"
        self._local = threading.local()

    def send(self, body: dict, session_id: str | None = None, timeout: float | None = None) -> tuple[float, int, bytes]:
        """POST ``body`` to /invocations: (seconds until the whole answer was read, status, body).

        Transport failures raise OSError or http.client.HTTPException; the connection is then dropped.
        """
        elapsed, _, status, payload = self._exchange(body, session_id, timeout, first_event=False)
        return elapsed, status, payload

    def _exchange(
        self, body: dict, session_id: str | None, timeout: float | None, first_event: bool
    ) -> tuple[float, float | None, int, bytes]:
        """(seconds to the whole answer, seconds to its first server-sent event if asked for and
        it came, status, body)."""
        headers = {"Content-Type": "application/json"}
        if session_id is not None:
            headers[SESSION_HEADER] = session_id
        data = json.dumps(body).encode()
        connection = self._connection(timeout or self.timeout)
        start = time.perf_counter()
        first = None
        try:
            connection.request("POST", self._path, body=data, headers=headers)
            response = connection.getresponse()
            if not first_event:
                payload = response.read()
            else:
                received = bytearray()
                events = wire.EventParser()
                while chunk := response.read1(1 << 16):  # each chunk as it arrives
                    received += chunk
                    if first is None and response.status == 200 and events.feed(chunk):
                        first = time.perf_counter() - start
                payload = bytes(received)
        except BaseException:
            connection.close()
            raise
        return time.perf_counter() - start, first, response.status, payload

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(*self._address, timeout=timeout)
        elif connection.sock is not None and select.select([connection.sock], [], [], 0)[0]:
            # An idle keep-alive socket that is readable was closed by the server: a POST sent on
            # it could be lost or, worse, half-sent; start a fresh connection instead.
            connection.close()
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection

    def _post(self, body: dict, session_id: str | None = None) -> tuple[float, dict]:
        elapsed, status, payload = self.send(body, session_id)
        if status != 200:
            raise ServerError(f"HTTP {status}: {payload[:500].decode('utf-8', errors='replace')}")
        return elapsed, json.loads(payload)

    def open(self, image_b64: str) -> tuple[float, str]:
        elapsed, reply = self._post({"requestType": NEW_SESSION, "images": [image_b64]})
        return elapsed, reply["session_id"]

    def open_with_question(self, image_b64: str, prompt: str, max_new_tokens: int) -> tuple[TurnSample, str]:
        """One request: open with the image and answer the first question (a cold first turn)."""
        body = {"requestType": NEW_SESSION, "images": [image_b64], "prompt": prompt,
                "max_new_tokens": max_new_tokens, "temperature": 0, "top_p": 1}
        elapsed, reply = self._post(body)
        return _turn_sample(elapsed, reply), reply["session_id"]

    def turn(self, session_id: str, prompt: str, max_new_tokens: int, images: list[str] | None = None) -> TurnSample:
        """A follow-up turn; ``images`` (base64) join the session's history with this question."""
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "top_p": 1}
        if images:
            body["images"] = list(images)
        elapsed, reply = self._post(body, session_id)
        return _turn_sample(elapsed, reply)

    def turn_streamed(self, session_id: str, prompt: str, max_new_tokens: int) -> TurnSample:
        """A turn with ``"stream": true``; its sample also says when the first event was read."""
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "top_p": 1, "stream": True}
        elapsed, first, status, payload = self._exchange(body, session_id, None, first_event=True)
        if status != 200:
            raise ServerError(f"HTTP {status}: {payload[:500].decode('utf-8', errors='replace')}")
        events = list(wire.iter_events([payload]))
        if not events or "generated_text" not in events[-1] or wire.event_error(events[-1]) is not None:
            raise ServerError(f"the stream did not end with an answer: {payload[-500:].decode('utf-8', errors='replace')}")
        sample = _turn_sample(elapsed, events[-1])
        sample.token_ids = [event["token"]["id"] for event in events if event.get("token")]
        sample.first_event_seconds = first
        return sample

    def close(self, session_id: str) -> None:
        self._post({"requestType": CLOSE}, session_id)


def _turn_sample(elapsed: float, reply: dict) -> TurnSample:
    usage = reply["usage"]
    return TurnSample(
        seconds=elapsed,
        token_ids=reply.get("token_ids"),
        text=reply["generated_text"],
        completion_tokens=int(usage["completion_tokens"]),
        prompt_tokens=int(usage["prompt_tokens"]),
        cached_tokens=int(usage["cached_tokens"]),
    )


WARM_UP_REQUESTS = 100


def warm_up(client: Client, image_b64: str, prompts: list[str], requests_to_send: int = WARM_UP_REQUESTS) -> None:
    """Bring the stack to the steady state of a running endpoint before anything is timed.

    TorchServe's front end is Java: its request path is compiled while it runs, and through the
    router the first ten requests took 7.6 ms where requests 100-200 took 5.2 ms (echo handler,
    2 CPU cores). Sessions of short turns (max_new_tokens=1) stay far below any model's context.
    """
    sent = 0
    while sent < requests_to_send:
        _, session_id = client.open(image_b64)
        try:
            for prompt in prompts[:8]:
                client.turn(session_id, prompt, 1)
            sent += 1 + min(len(prompts), 8) + 1
        finally:
            client.close(session_id)


def cold_open(client: Client, image_b64: str, prompt: str) -> TurnSample:
    """A cold first turn as a client makes it: one request opens with the image and asks; then closed."""
    sample, session_id = client.open_with_question(image_b64, prompt, 1)
    client.close(session_id)
    return sample


def staircase(client: Client, image_b64: str, prompts: list[str], max_new_tokens: int) -> ServedSamples:
    """One repeat's sessions S_2..S_K (probe turn k after k-1 full turns) and one all-full session.

    Turn 1's samples (``cold``) are the runner's to add: it times them next to the stateless turn 1.
    """
    samples = ServedSamples()
    turns = len(prompts)
    for k in range(1, turns + 1):  # k == turns: the all-full session
        open_s, session_id = client.open(image_b64)
        samples.open_s.append(open_s)
        try:
            for j in range(k):
                samples.full.setdefault(j, []).append(client.turn(session_id, prompts[j], max_new_tokens))
            if k < turns:
                samples.probe[k] = client.turn(session_id, prompts[k], 1)
        finally:
            client.close(session_id)
    _, session_id = client.open(image_b64)
    try:
        for k in range(turns):
            samples.streamed[k] = client.turn_streamed(session_id, prompts[k], max_new_tokens)
    finally:
        client.close(session_id)
    return samples


def conversation(client: Client, image_b64: str, prompts: list[str], max_new_tokens: list[int],
                 turn_images: list[list[str]]) -> list[TurnSample]:
    """One session through a planned conversation: opened with ``image_b64``, turn k sends
    ``turn_images[k]`` with its question and asks for ``max_new_tokens[k]`` tokens (a one-token
    turn's seconds are its TTFT). The samples of every turn, in order; the session is closed after."""
    _, session_id = client.open(image_b64)
    try:
        return [client.turn(session_id, prompt, new, images)
                for prompt, new, images in zip(prompts, max_new_tokens, turn_images, strict=True)]
    finally:
        client.close(session_id)


@dataclass
class ConcurrencySample:
    single_tps: float
    concurrent_tps: float
    single_tokens: int
    concurrent_tokens: int


def concurrency(
    client: Client, image_b64: str, prompts: list[str], max_new_tokens: int, sessions: int
) -> ConcurrencySample:
    """Aggregate tokens/s of ``sessions`` sessions sending a follow-up turn at once, and of one alone.

    Every session is opened and given turn 1 first (untimed); the timed turn is turn 2.
    """
    with ThreadPoolExecutor(sessions) as pool:

        def prepare(_):
            _, sid = client.open(image_b64)
            client.turn(sid, prompts[0], max_new_tokens)
            return sid

        ids = list(pool.map(prepare, range(sessions + 1)))
        try:
            alone = client.turn(ids[0], prompts[1], max_new_tokens)
            barrier = threading.Barrier(sessions)

            def follow_up(sid):
                barrier.wait()
                return client.turn(sid, prompts[1], max_new_tokens)

            start = time.perf_counter()
            results = list(pool.map(follow_up, ids[1:]))
            wall = time.perf_counter() - start
        finally:
            for sid in ids:
                client.close(sid)
    tokens = sum(r.completion_tokens for r in results)
    return ConcurrencySample(
        single_tps=alone.completion_tokens / alone.seconds,
        concurrent_tps=tokens / wall,
        single_tokens=alone.completion_tokens,
        concurrent_tokens=tokens,
    )


class StackProcess:
    """The serving stack in a process of its own, as ``llava-sessions serve`` runs it.

    The bench's client threads then do not share an interpreter lock with the router, as no
    real client does. The child stops the stack when told, or when this process goes away.
    ``workers`` model copies; ``cpu_threads``: each CPU worker's torch threads (None: the
    stack's default, the cores divided by the workers).
    """

    def __init__(self, model_dir: Path, work_dir: Path, device: str, ready_timeout: float = 900.0,
                 workers: int = 1, cpu_threads: int | None = None, compile: str = "auto"):
        self.args = (str(model_dir), str(work_dir), device, workers, cpu_threads, compile)
        self.ready_timeout = ready_timeout
        self.url: str | None = None

    def __enter__(self) -> "StackProcess":
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve_until_told, args=(*self.args, child_conn), name="bench-stack")
        self._process.start()
        child_conn.close()
        try:
            if not self._conn.poll(self.ready_timeout):
                raise ServerError(f"the serving stack was not ready within {self.ready_timeout:.0f} s")
            status, detail = self._conn.recv()
        except (EOFError, ServerError):
            self.__exit__(None, None, None)
            raise ServerError("the serving stack's process exited before it was ready") from None
        if status != "ready":
            self.__exit__(None, None, None)
            raise ServerError(f"the serving stack did not start: {detail}")
        self.url = detail
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._conn.send("stop")
        except (OSError, ValueError):
            pass
        self._process.join(120)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
        self._conn.close()


def _serve_until_told(model_dir: str, work_dir: str, device: str, workers: int, cpu_threads: int | None,
                      compile: str, conn) -> None:
    import os

    # The workers read these from the environment the stack's TorchServe inherits.
    if cpu_threads is not None:
        os.environ["LLAVA_SESSIONS_CPU_THREADS"] = str(cpu_threads)
    os.environ["LLAVA_SESSIONS_COMPILE"] = compile
    try:
        stack = start_stack(Path(model_dir), Path(work_dir), device, workers=workers)
    except Exception as error:
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    try:
        conn.send(("ready", stack.url))
        conn.recv()  # "stop", or EOFError when the bench went away
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        stack.stop()


def worker_step_counts(work_dir: Path, settle_s: float = 1.5) -> dict[str, int]:
    """The served worker's step counters (``llava_step_compiles``, ``llava_cuda_graph_skips``;
    ``turns_joined``: follow-ups that joined a running bundle) from the metrics of the stack
    started in ``work_dir``; {} when they cannot be read."""
    from llava_sessions.loadtest import config_property, parse_prometheus

    config = work_dir / "run" / "config.properties"  # what start_stack's TorchServe runs with
    address = config_property(config, "metrics_address") if config.exists() else None
    if address is None:
        return {}
    time.sleep(settle_s)  # the handler writes its metrics once a second
    url = urllib.parse.urlsplit(address)
    try:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except OSError:
        return {}
    counts = {"llava_step_compiles": 0, "llava_cuda_graph_skips": 0, "turns_joined": 0}
    for name, labels, value in parse_prometheus(text):
        if name in counts:
            counts[name] += int(value)
        elif name == "llava_bundle_joins" and labels.get("outcome") == "joined":
            counts["turns_joined"] += int(value)
    return counts


def start_stack(model_dir: Path, work_dir: Path, device: str, max_sessions_per_worker: int = 32, workers: int = 1):
    """Build the archive and start a ServingStack with ``workers`` workers on a free loopback port."""
    from llava_sessions.archive import build_archive
    from llava_sessions.serving_stack import ServingStack

    overrides = {} if device == "auto" else {"device": device}
    archive = build_archive(
        model_dir,
        work_dir / "archive",
        max_sessions_per_worker=max_sessions_per_worker,
        session_ttl_s=3600,
        handler_overrides=overrides,
    )
    return ServingStack(archive, work_dir / "run", workers=workers, port=0).start(ready_timeout=900)
