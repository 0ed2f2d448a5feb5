"""What passes between the affinity router and its workers only, and how a worker knows it is the router.

Clients never speak on this hop: the router refuses a client request that carries any
``X-Llava-Sessions-*`` header (``is_internal``), and a worker honours those headers (a bundle, a
request id, when the router received the request) only when the request also carries the
secret that the router and its workers share for this start (``from_router``). The secret is
made once per ``serve`` (``new_secret``) and reaches the workers in ``LLAVA_SESSIONS_ROUTER_SECRET``.

A client that goes away while its turn waits or runs is told to the turn's worker at once, out
of band: TorchServe hands a worker one request at a time and never tells it about the client, so
the router sends the request's id as one datagram to a Unix socket that the worker listens on
(``CancelSender`` / ``CancelListener``). The socket lives in Linux's abstract namespace (no file
to clean up), named from the secret and the model copy, and every datagram carries the secret.

A request that finds its worker busy with a bundle may join it (``JoinSender`` /
``JoinListener``): the router sends it to the worker out of band, tagged with the bundle's
request id and its member index there; the worker's running turns take it in at a step's end
and its frames come back in that bundle's answer. One the worker does not take by the bundle's
end leaves no frame, and the router sends it with the next bundle.

Torch-free: the router imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger(__name__)

SECRET_ENV = "LLAVA_SESSIONS_ROUTER_SECRET"
INTERNAL_PREFIX = "x-llava-sessions-"
SECRET_HEADER = "X-Llava-Sessions-Router-Secret"
REQUEST_ID_HEADER = "X-Llava-Sessions-Request-Id"
RECEIVED_AT_HEADER = "X-Llava-Sessions-Received-At"  # epoch seconds, when the router read the request
DIALECT_HEADER = "X-Llava-Sessions-Dialect"  # the dialect the route implies (/v1/chat/completions: openai)

# A cancellation is remembered this long, for a request that reaches its worker after it.
CANCEL_MEMORY_S = 600.0
MAX_REMEMBERED = 4096
_MAX_DATAGRAM = 512


def new_secret() -> str:
    return secrets.token_hex(32)


def is_internal(header_name: str) -> bool:
    return header_name.lower().startswith(INTERNAL_PREFIX)


def header(headers: Mapping, name: str) -> str | None:
    """A header's value whatever the case of its name (TorchServe keeps the sender's spelling)."""
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def from_router(headers: Mapping, secret: str | None) -> bool:
    """Whether the request carries this start's router secret (compared in constant time)."""
    sent = header(headers, SECRET_HEADER)
    if not secret or sent is None:
        return False
    return hmac.compare_digest(sent.strip().encode(), secret.encode())


@dataclass(frozen=True)
class Hop:
    """What the router said about one request: its id (for cancellation) and when it arrived."""

    request_id: str | None
    received_at: float  # epoch seconds
    dialect: str | None = None  # the dialect its route implies, if any

    @classmethod
    def of(cls, headers: Mapping, trusted: bool) -> "Hop":
        """From the router's headers when ``trusted``; otherwise no id, received now."""
        if not trusted:
            return cls(None, time.time())
        try:
            received_at = float(header(headers, RECEIVED_AT_HEADER) or "")
        except ValueError:
            received_at = time.time()
        return cls(header(headers, REQUEST_ID_HEADER), received_at, header(headers, DIALECT_HEADER))

    def headers(self, secret: str) -> dict[str, str]:
        """The router's side: the headers that say this, with the secret."""
        sent = {SECRET_HEADER: secret, RECEIVED_AT_HEADER: f"{self.received_at:.6f}"}
        if self.request_id is not None:
            sent[REQUEST_ID_HEADER] = self.request_id
        if self.dialect is not None:
            sent[DIALECT_HEADER] = self.dialect
        return sent


def new_request_id() -> str:
    return secrets.token_hex(12)


def _address(secret: str, model_name: str, kind: str = "cancel") -> bytes:
    digest = hashlib.sha256(f"{secret}/{model_name}".encode()).hexdigest()[:32]
    return f"\0llava-sessions-{kind}-".encode() + digest.encode()


class CancelSender:
    """The router's end: one datagram per request whose client went away. Never blocks."""

    def __init__(self, secret: str):
        self._secret = secret.encode()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def cancel(self, model_name: str, request_id: str) -> None:
        try:
            self._socket.sendto(self._secret + b" " + request_id.encode(), _address(self._secret.decode(), model_name))
        except OSError as exc:  # no listener (the worker restarts) or its queue is full: nothing to stop
            log.debug("cancel for %s not delivered: %s", model_name, type(exc).__name__)

    def close(self) -> None:
        self._socket.close()


class _DatagramListener:
    """A worker's socket for one kind of the router's datagrams, and the thread that reads it:
    each datagram that carries the secret goes to ``_received`` (its payload, after the secret)."""

    def __init__(self, secret: str, model_name: str, kind: str, max_datagram: int, buffer: int | None = None):
        self._secret = secret.encode()
        self._max_datagram = max_datagram
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if buffer is not None:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self._socket.bind(_address(secret, model_name, kind))
        self._thread = threading.Thread(target=self._listen, name=f"router-{kind}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop: the thread's recv returns (closing alone would leave it blocked, and the address
        bound until a datagram came), then the socket is closed and its address free."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._socket.close()

    def _listen(self) -> None:
        while True:
            try:
                datagram = self._socket.recv(self._max_datagram)
            except OSError:  # closed
                return
            if not datagram:  # shut down
                return
            secret, _, payload = datagram.partition(b" ")
            if hmac.compare_digest(secret, self._secret) and payload:
                self._received(payload)

    def _received(self, payload: bytes) -> None:
        raise NotImplementedError


class CancelListener(_DatagramListener):
    """The worker's end: a thread that remembers which request ids were cancelled, for a while."""

    def __init__(self, secret: str, model_name: str):
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        super().__init__(secret, model_name, "cancel", _MAX_DATAGRAM)

    def is_cancelled(self, request_id: str | None) -> bool:
        if request_id is None:
            return False
        with self._lock:
            return request_id in self._cancelled

    def _received(self, payload: bytes) -> None:
        self._remember(payload.decode("ascii", errors="replace"))

    def _remember(self, request_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._cancelled[request_id] = now
            while self._cancelled and (
                len(self._cancelled) > MAX_REMEMBERED or next(iter(self._cancelled.values())) < now - CANCEL_MEMORY_S
            ):
                self._cancelled.popitem(last=False)


# --- joining a running bundle -----------------------------------------------------------

# A joiner's body travels in one datagram: a follow-up question's is a few hundred bytes; one
# bigger than this (images) waits for the next bundle.
JOIN_MAX_BODY = 64 * 1024
_JOIN_SOCKET_BUFFER = 1 << 20
_JOIN_MAX_DATAGRAM = JOIN_MAX_BODY + 16 * 1024
_JOIN_HEAD = struct.Struct(">I")
# Joiners kept for a bundle the worker has not reached yet (TorchServe's queue), at most:
JOIN_MEMORY_S = 60.0
MAX_QUEUED_JOINERS = 64


@dataclass(frozen=True)
class Joiner:
    """A client request sent to join a running bundle as its member ``member``."""

    bundle_id: str
    member: int
    headers: dict[str, str]  # as a bundle member's: the router's hop headers included
    body: bytes


class JoinSender:
    """The router's end: one datagram per joiner. Never blocks; False when it was not sent."""

    def __init__(self, secret: str):
        self._secret = secret
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _JOIN_SOCKET_BUFFER)
        self._socket.setblocking(False)

    def offer(self, model_name: str, joiner: Joiner) -> bool:
        if len(joiner.body) > JOIN_MAX_BODY:
            return False
        head = json.dumps({"bundle": joiner.bundle_id, "member": joiner.member, "headers": joiner.headers}).encode()
        datagram = b"".join([self._secret.encode(), b" ", _JOIN_HEAD.pack(len(head)), head, joiner.body])
        try:
            self._socket.sendto(datagram, _address(self._secret, model_name, "join"))
        except OSError as exc:  # no listener (a worker without joining, restarting) or its queue is full
            log.debug("joiner for %s not delivered: %s", model_name, type(exc).__name__)
            return False
        return True

    def close(self) -> None:
        self._socket.close()


class JoinListener(_DatagramListener):
    """The worker's end: joiners by bundle id, until their bundle takes them (``take``) or ends
    (``end``: those left, and any that come later, are dropped; the router sends them again)."""

    def __init__(self, secret: str, model_name: str):
        self._queued: dict[str, list[tuple[float, Joiner]]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        super().__init__(secret, model_name, "join", _JOIN_MAX_DATAGRAM, _JOIN_SOCKET_BUFFER)

    def take(self, bundle_id: str) -> list[Joiner]:
        """The joiners that came for this bundle so far, in order; each is taken once."""
        if not self._queued:  # every step's end asks: nothing to lock for most of them
            return []
        with self._lock:
            return [joiner for _, joiner in self._queued.pop(bundle_id, [])]

    def waiting(self, bundle_id: str) -> int:
        """How many joiners wait for this bundle now."""
        with self._lock:
            return len(self._queued.get(bundle_id, ()))

    def end(self, bundle_id: str) -> None:
        with self._lock:
            self._queued.pop(bundle_id, None)
            self._ended[bundle_id] = None
            while len(self._ended) > MAX_REMEMBERED:
                self._ended.popitem(last=False)

    def _received(self, payload: bytes) -> None:
        joiner = self._parse(payload)
        if joiner is not None:
            self._queue(joiner)

    def _parse(self, rest: bytes) -> Joiner | None:
        if len(rest) < _JOIN_HEAD.size:
            return None
        (length,) = _JOIN_HEAD.unpack_from(rest)
        try:
            head = json.loads(rest[_JOIN_HEAD.size : _JOIN_HEAD.size + length])
            headers = {str(k): str(v) for k, v in head["headers"].items()}
            return Joiner(str(head["bundle"]), int(head["member"]), headers, rest[_JOIN_HEAD.size + length :])
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("a malformed joiner datagram was dropped")
            return None

    def _queue(self, joiner: Joiner) -> None:
        now = time.monotonic()
        with self._lock:
            if joiner.bundle_id in self._ended:
                return
            for bundle_id in [b for b, queued in self._queued.items() if queued[0][0] < now - JOIN_MEMORY_S]:
                del self._queued[bundle_id]  # a bundle that never came to this worker
            if sum(len(queued) for queued in self._queued.values()) >= MAX_QUEUED_JOINERS:
                return
            self._queued.setdefault(joiner.bundle_id, []).append((now, joiner))
