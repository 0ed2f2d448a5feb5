"""TorchServe adapter over the session engine: headers, JSON, status codes.

Four hooks, read top to bottom: ``initialize`` loads the engine once per worker;
per request ``decode_request`` parses headers and body (its dialect, handler/dialects/),
``run`` calls the engine for an open or a close and ``run_batch`` for the batch's turns
together (their decoding is batched across sessions; a one-shot answer is a turn on a
session opened for it and closed after), ``encode_response`` renders the answer in the
request's dialect. ``handle`` is TorchServe's entry point and only glues them together.
A client mistake never raises out of ``handle`` (that would fail the whole batch): it
becomes a 4xx JSON error for that request alone. A turn with ``"stream": true`` sends one
event per token as it is generated (``handler/streaming.py``) to that request alone; its
last events are what ``handle`` returns for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from http import HTTPStatus

from llava_sessions.config import START_REFUSAL_FILE_ENV, ServingConfig
from llava_sessions.errors import ConfigError, InternalError, InvalidRequest, SessionsError, TurnCancelled
from llava_sessions.handler import bundle, image_sources, protocol, router_hop, streaming
from llava_sessions.handler.joiners import BundleJoiners
from llava_sessions.handler.pending import PendingRequest
from llava_sessions.handler.replies import Reply, error_reply
from llava_sessions.handler.requests import CloseSession, OneShot, OpenSession, Turn
from llava_sessions.wire import CLOSED_SESSION_HEADER, SESSION_HEADER, format_session_header

log = logging.getLogger(__name__)


class LlavaSessionHandler:
    def __init__(self):
        self.engine = None
        self.config: ServingConfig | None = None
        self.metrics = None  # SessionMetrics when TorchServe provides a metrics cache
        # This start's router secret (router_hop.py): bundles and the router's headers need it.
        self.router_secret: str | None = None
        self.cancellations: router_hop.CancelListener | None = None
        self.joins: router_hop.JoinListener | None = None  # requests that join a running bundle
        self.initialized = False

    # --- hook 1: once per worker --------------------------------------------

    def initialize(self, context) -> None:
        try:
            self._initialize(context)
        except ConfigError as error:  # refused at start: tell whoever waits for this worker
            refusal_file = os.environ.get(START_REFUSAL_FILE_ENV)
            if refusal_file:
                with open(refusal_file, "a", encoding="utf-8") as f:
                    f.write(str(error).replace("\n", " ") + "\n")
            raise

    def _initialize(self, context) -> None:
        # Imported here so this module (and its tests) load without torch.
        from llava_sessions.handler.engine import host_allocator
        from llava_sessions.handler.engine.engine import SessionEngine
        from llava_sessions.handler.engine.model_loader import load_model, resolve_device

        host_allocator.keep_freed_memory()  # this worker process is the sessions' server

        properties = context.system_properties
        yaml_section = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.config = ServingConfig.from_sources(yaml_section)
        from llava_sessions.archive import CHECKPOINT_SUBDIR  # where build_archive puts the checkpoint

        source = self.config.model or os.path.join(properties["model_dir"], CHECKPOINT_SUBDIR)
        device = resolve_device(self.config.device, properties.get("gpu_id"))
        if device.type == "cpu" and self.config.cpu_threads:
            import torch

            torch.set_num_threads(self.config.cpu_threads)  # this worker's share of the host's cores
        self.engine = SessionEngine(load_model(source, device, self.config.dtype), self.config)
        self.engine.warm_up()  # a compiled step's shapes compile before the worker is READY
        if getattr(context, "metrics", None) is not None:
            from llava_sessions.handler.metrics import SessionMetrics

            self.metrics = SessionMetrics(context.metrics, context.model_name)
        # Check often enough that a session outlives its TTL by at most a quarter of it; the
        # gauges show what expiry freed then, not at the next request.
        self.engine.start_expiry_sweeper(
            interval_s=min(5.0, self.config.session_ttl_s / 4), on_sweep=self._observe_engine
        )
        self.router_secret = os.environ.get(router_hop.SECRET_ENV) or None
        if self.router_secret is not None:
            self.cancellations = router_hop.CancelListener(self.router_secret, context.model_name)
            self.joins = router_hop.JoinListener(self.router_secret, context.model_name)
        self.initialized = True

    def _observe_engine(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_engine(self.engine)

    # --- TorchServe's entry point -------------------------------------------

    def handle(self, data: list[dict], context) -> list[str | bytes]:
        """The batch's requests in order; its turns (of different sessions) run together.

        A request may be a bundle of client requests (``handler/bundle.py``): the affinity
        router's batch. Its members run as the batch's requests do, and its answer is their
        answers in frames. Each request is parsed (and a turn's images loaded) on its own.
        Opens and closes run in place; turns wait and run in one ``run_batch`` call, so their
        decoding is batched. A close that names a session with a waiting turn runs after that turn.
        Requests the router sends to join a bundle while its turns decode become its members
        (``handler/joiners.py``).
        """
        items, bundles = self._unpack(data, context)
        joiners = self._joiners(bundles, items)
        try:
            waiting: list[PendingRequest] = []
            for item in list(items):
                if item.reply is not None:
                    continue
                if isinstance(item.request, (Turn, OneShot)):
                    waiting.append(item)
                    continue
                if isinstance(item.request, CloseSession) and any(
                    w.turn.session_id == item.request.session_id for w in waiting
                ):
                    self._run_waiting(waiting, joiners)
                    waiting = []
                self._guarded(item, lambda: self._respond(item, self.run(item.request, item.stream, item.hop)))
            self._run_waiting(waiting, joiners)
        finally:
            if joiners is not None:
                joiners.end()
        by_row: dict[int, list[PendingRequest]] = {}
        for item in items:
            by_row.setdefault(item.idx, []).append(item)
        bodies: list[str | bytes] = []
        for idx, row_items in sorted(by_row.items()):
            if idx in bundles:
                bodies.append(self._bundle_answer(context, idx, row_items))
            else:
                [item] = row_items
                self._send(context, idx, item.reply)
                bodies.append(item.reply.render())
        self._observe_engine()
        return bodies

    def _joiners(self, bundles: dict, items: list[PendingRequest]) -> BundleJoiners | None:
        """What may join the batch's bundle while its turns run (a batch of one bundle, from the router)."""
        if self.joins is None or len(bundles) != 1:
            return None
        [(idx, (bundle_id, row_sink))] = bundles.items()
        if bundle_id is None:
            return None
        return BundleJoiners(self.joins, bundle_id, idx, row_sink, self._prepare_joiner, items)

    def _prepare_joiner(self, item: PendingRequest, joiner: router_hop.Joiner) -> bool:
        """Make a joiner ready to run: a follow-up turn with no image to read. Anything else, or a
        body that does not parse, is left for the next bundle (False), where it gets its answer."""
        try:
            item.hop = router_hop.Hop.of(joiner.headers, True)  # sent with the secret, as a bundle's members
            request = self.decode_request({"body": joiner.body}, joiner.headers, item.hop.dialect)
        except Exception:
            return False
        if not isinstance(request, Turn) or request.images or any(m.images for m in request.history or ()):
            return False
        item.request = request
        item.stream = self._token_stream(request, item.sink)
        try:
            turn = self.turn_request(request, item.stream, item.hop)
        except Exception:
            return False
        item.turn = dataclasses.replace(turn, on_done=lambda outcome: self._joined(item, outcome))
        return True

    def _joined(self, item: PendingRequest, outcome) -> None:
        """A joiner's outcome (the batch's return value never holds it): observed and answered."""
        self._observe_turn(outcome)
        self._answer_early(item, outcome)

    def _unpack(self, data: list[dict], context) -> tuple[list[PendingRequest], dict]:
        """Every client request of the batch, parsed (bundles opened); and the bundles by index:
        (the router's id for it, its answer's sink)."""
        items, bundles = [], {}
        for idx, row in enumerate(data):
            headers = context.get_all_request_header(idx) or {}
            trusted = router_hop.from_router(headers, self.router_secret)
            try:
                count = bundle.member_count(headers)
                if count is not None and not trusted:
                    raise InvalidRequest("bundles come only from this server's own router; send one request per call")
                members = None if count is None else bundle.decode_request(_body_bytes(row), count)
            except SessionsError as error:
                item = PendingRequest(idx)
                self._fail(item, error)
                items.append(item)
                continue
            if members is None:
                item = PendingRequest(idx)
                sink = streaming.TorchServeSink(context, idx)
                self._guarded(item, self._prepare, item, row, headers, sink, trusted)
                items.append(item)
                continue
            row_sink = streaming.TorchServeSink(context, idx, content_type=bundle.CONTENT_TYPE)
            bundles[idx] = (router_hop.header(headers, router_hop.REQUEST_ID_HEADER), row_sink)
            for member, (member_headers, body) in enumerate(members):
                item = PendingRequest(idx, member, sink=streaming.BundleMemberSink(row_sink, member))
                # The bundle came with the secret: its members' own headers are the router's.
                self._guarded(item, self._prepare, item, {"body": body}, member_headers, item.sink, True)
                items.append(item)
        return items, bundles

    def _bundle_answer(self, context, idx: int, members: list[PendingRequest]) -> bytes:
        """A bundle's answer: the members not answered yet (``_answer_early``)."""
        context.set_response_status(200, HTTPStatus.OK.phrase, idx)
        context.set_response_content_type(idx, bundle.CONTENT_TYPE)
        return b"".join(_member_frames(item) for item in members if not item.sent)

    def _answer_early(self, item: PendingRequest, outcome) -> None:
        """A bundle member whose turn ended while others of the batch still run: its answer goes
        now, ahead of the bundle's final response (the router ends that client's answer at its
        END frame), instead of waiting for the longest turn of the batch."""
        item.outcome = outcome
        if isinstance(outcome, Exception):
            self._fail(item, outcome)
        else:
            self._guarded(item, self._respond, item, outcome)
        try:
            item.sink.send_frames(_member_frames(item))
            item.sent = True
        except Exception:  # it goes with the final response instead
            log.exception("a bundle member's early answer could not be sent")

    def handle_one(self, row: dict, headers: dict, sink=None) -> Reply:
        """One request alone; ``sink`` sends a streamed turn's chunks (None: nothing streams)."""
        item = PendingRequest(0)
        trusted = router_hop.from_router(headers, self.router_secret)
        self._guarded(item, self._prepare, item, row, headers, sink, trusted)
        if item.reply is None:
            if isinstance(item.request, (Turn, OneShot)):
                self._run_waiting([item])
            else:
                self._guarded(item, lambda: self._respond(item, self.run(item.request, item.stream, item.hop)))
        return item.reply

    def _prepare(self, item: PendingRequest, row: dict, headers: dict, sink, trusted: bool) -> None:
        """Hook 2 for one request, plus what a turn needs before it can join the batch.

        ``trusted``: the request came from this start's router, so its hop headers count."""
        item.hop = router_hop.Hop.of(headers, trusted)
        item.request = self.decode_request(row, headers, item.hop.dialect)
        item.stream = self._token_stream(item.request, sink)
        if isinstance(item.request, Turn):
            item.turn = self.turn_request(item.request, item.stream, item.hop)
        elif isinstance(item.request, OneShot):
            item.turn = self.one_shot_request(item.request, item.stream, item.hop)
        if item.turn is not None and item.member is not None:  # a bundle member answers when its turn ends
            item.turn = dataclasses.replace(item.turn, on_done=lambda outcome: self._answer_early(item, outcome))

    def _run_waiting(self, waiting: list[PendingRequest], joiners: BundleJoiners | None = None) -> None:
        """Run the turns and answer each (a bundle member answered early is answered)."""
        self._execute(waiting, joiners)
        for item in waiting:
            if item.sent:
                continue
            if isinstance(item.outcome, Exception):
                self._fail(item, item.outcome)
            else:
                self._guarded(item, self._respond, item, item.outcome)

    def _execute(self, waiting: list[PendingRequest], joiners: BundleJoiners | None = None) -> None:
        """Run the turns together (``joiners`` may join them); each item's ``outcome`` is its result
        or exception."""
        if not waiting:
            return
        try:
            outcomes = self.run_batch([item.turn for item in waiting], joiners)
        except Exception as error:  # the engine itself failed: every turn of the batch fails
            outcomes = [error] * len(waiting)
        finally:
            for item in waiting:
                if isinstance(item.request, OneShot):  # answered: nothing is kept
                    self._forget(item.turn.session_id)
        for item, outcome in zip(waiting, outcomes):
            item.outcome = outcome

    def _respond(self, item: PendingRequest, result) -> None:
        item.reply = self.encode_response(item.request, result, item.stream)

    def _guarded(self, item: PendingRequest, step, *args) -> None:
        """Run one step for one request; a failure becomes that request's error reply alone."""
        try:
            step(*args)
        except Exception as error:
            self._fail(item, error)

    def _fail(self, item: PendingRequest, error: Exception) -> None:
        if not isinstance(error, SessionsError):
            log.error("request failed", exc_info=error)
            error = InternalError("the server failed to process this request; it has been logged")
        dialect = getattr(item.request, "dialect", None)
        if item.stream is not None and item.stream.started:  # the stream's last event instead
            item.reply = item.stream.error_reply(error)
        else:
            item.reply = error_reply(error, dialect)

    def _token_stream(self, request, sink) -> streaming.TokenStream | None:
        """The token stream of a turn that asked for one (its dialect frames the events)."""
        turn = request.turn if isinstance(request, OneShot) else request
        if sink is None or not isinstance(turn, Turn) or not turn.stream:
            return None
        loaded = self.engine.loaded
        special_ids = set(loaded.eos_token_ids) | set(loaded.tokenizer.all_special_ids)
        return streaming.TokenStream(loaded.tokenizer, special_ids, sink, turn.dialect.stream_events(turn), turn.stop)

    # --- hook 2: parse --------------------------------------------------------

    def decode_request(self, row: dict, headers: dict, hint: str | None = None):
        """``hint``: the dialect the router's route implies (``/v1/chat/completions``)."""
        return protocol.parse_request(_body_bytes(row), headers, self.config, hint)

    # --- hook 3: run on the engine -------------------------------------------

    def run(self, request, stream: streaming.TokenStream | None = None, hop: router_hop.Hop | None = None):
        """Open or close a session; a lone turn runs as a batch of one."""
        hop = hop or router_hop.Hop(None, time.time())
        if isinstance(request, OpenSession):
            opened = self.engine.open_session(self._image_inputs(request.images))
            first = self._answer_first_question(request, opened.session_id, hop)
            if self._client_gone(hop):  # nobody will learn the id: the session would only wait for its TTL
                self.engine.close_session(opened.session_id)
                raise TurnCancelled("the client closed the connection; the session it opened was closed again")
            return opened, first
        if isinstance(request, (Turn, OneShot)):
            item = PendingRequest(0, request=request, stream=stream, hop=hop)
            item.turn = (self.turn_request(request, stream, hop) if isinstance(request, Turn)
                         else self.one_shot_request(request, stream, hop))
            self._execute([item])
            if isinstance(item.outcome, Exception):
                raise item.outcome
            return item.outcome
        self.engine.close_session(request.session_id)
        return None

    def _answer_first_question(self, request: OpenSession, session_id: str, hop: router_hop.Hop):
        """The open's own question, as the session's first turn; None when it brought none.

        If it fails the session is closed again: the client gets an error, not the id.
        """
        if request.first_turn is None:
            return None
        try:
            return self.run(dataclasses.replace(request.first_turn, session_id=session_id), None, hop)
        except Exception:
            self.engine.close_session(session_id)
            raise

    def one_shot_request(self, request: OneShot, stream: streaming.TokenStream | None = None,
                         hop: router_hop.Hop | None = None):
        """The engine's TurnRequest of a one-shot answer, on a session opened for it alone
        (``_run_waiting`` forgets it once answered)."""
        turn = request.turn
        images, history = self._image_inputs(turn.images), self._history(turn.history)  # read before opening
        opened = self.engine.open_session(transient=True)  # a worker full of sessions still answers it
        return self.turn_request(dataclasses.replace(turn, session_id=opened.session_id), stream, hop,
                                 (images, history))

    def turn_request(self, request: Turn, stream: streaming.TokenStream | None = None,
                     hop: router_hop.Hop | None = None, read=None):
        """The engine's TurnRequest for a parsed turn: its images read (``read``: already), its
        stream's callback, whether its client is gone, and (not streamed) its deadline."""
        from llava_sessions.handler.engine.engine import TurnRequest
        from llava_sessions.handler.engine.generation import SamplingParams

        hop = hop or router_hop.Hop(None, time.time())
        images, history = read or (self._image_inputs(request.images), self._history(request.history))
        params = SamplingParams(request.max_new_tokens, request.temperature, request.top_p, top_k=request.top_k,
                                repetition_penalty=request.repetition_penalty, stop=request.stop)
        on_token = stream.on_token if stream is not None else None
        cancelled = None
        if self.cancellations is not None and hop.request_id is not None:
            cancelled = lambda: self._client_gone(hop)  # noqa: E731
        deadline = None
        if stream is None and self.config.turn_deadline_s > 0:
            # When the router received it, on this process's monotonic clock.
            deadline = time.monotonic() + hop.received_at + self.config.turn_deadline_s - time.time()
        return TurnRequest(request.session_id, request.prompt, params, tuple(images), on_token, cancelled, deadline,
                           history=history, rewind_to=request.rewind_to)

    def _image_inputs(self, refs) -> list:
        """The images of ``refs``, read now and decoded only when their session lacks them."""
        from llava_sessions.handler.engine.api import ImageInput

        return [ImageInput(image.digest, image.load) for image in image_sources.read_images(refs, self.config)]

    def _history(self, history) -> tuple | None:
        """A chat body's conversation before its question, as the engine's messages."""
        if history is None:
            return None
        from llava_sessions.handler.engine.api import Message

        return tuple(Message(m.role, m.text, tuple(self._image_inputs(m.images))) for m in history)

    def _forget(self, session_id: str) -> None:
        """Close a session that was only for one answer, if it is still open."""
        try:
            self.engine.close_session(session_id)
        except SessionsError:
            pass

    def _client_gone(self, hop: router_hop.Hop) -> bool:
        return self.cancellations is not None and self.cancellations.is_cancelled(hop.request_id)

    def run_batch(self, turns: list, joiners=None) -> list:
        """Turns of different sessions on the engine together; a result or an exception for each
        (``joiners``: engine api.Joiners, told their outcomes on their own)."""
        outcomes = self.engine.turns(turns, joiners)
        for outcome in outcomes:
            self._observe_turn(outcome)
        return outcomes

    def _observe_turn(self, outcome) -> None:
        """A turn's cache use and timings to the metrics (an error has none)."""
        if self.metrics is not None and not isinstance(outcome, Exception):
            self.metrics.observe_turn(outcome.cached_tokens, outcome.ttft_s, outcome.time_per_output_token_s)

    # --- hook 4: render -------------------------------------------------------

    def encode_response(self, request, result, stream: streaming.TokenStream | None = None) -> Reply:
        """The answer in the request's dialect; an open's session travels in the header."""
        dialect = request.dialect
        if isinstance(request, OpenSession):
            opened, first = result
            header = format_session_header(opened.session_id, opened.expires_at)
            body = dialect.open_body(opened.session_id, opened.expires_at, first, request.first_turn)
            return Reply(200, body, {SESSION_HEADER: header})
        if isinstance(request, (Turn, OneShot)):
            if stream is not None:
                return stream.final_reply(result)
            return Reply(200, dialect.turn_body(result, request.turn if isinstance(request, OneShot) else request))
        return Reply(200, dialect.close_body(request.session_id), {CLOSED_SESSION_HEADER: request.session_id})

    def _send(self, context, idx: int, reply: Reply) -> None:
        context.set_response_status(reply.status, _phrase(reply.status), idx)
        context.set_response_content_type(idx, reply.content_type)
        for name, value in reply.headers.items():
            context.set_response_header(idx, name, value)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 499: nginx's "client closed request", not in the standard list
        return "Client Closed Request" if status == 499 else "Unknown"


def _member_frames(item: PendingRequest) -> bytes:
    """A bundle member's answer as frames: its head (unless its stream sent it), body and end."""
    reply, frames = item.reply, []
    if item.stream is None or not item.stream.started:
        frames.append(bundle.head_frame(item.member, reply.status, reply.headers, reply.content_type))
    frames.append(bundle.frame(item.member, bundle.DATA, reply.render()))
    frames.append(bundle.frame(item.member, bundle.END))
    return b"".join(frames)


def _body_bytes(row: dict) -> bytes:
    """A request's body as bytes, however TorchServe handed it over."""
    body = row.get("body")
    if body is None:
        body = row.get("data", b"")
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, (bytes, bytearray)):
        # TorchServe already decoded it (TS_DECODE_INPUT_REQUEST unset); re-encode faithfully.
        body = json.dumps(body).encode("utf-8")
    return bytes(body)
