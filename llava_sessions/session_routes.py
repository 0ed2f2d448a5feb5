"""Which backend holds which session: bookkeeping for session-affinity routing, no I/O.

A session lives in exactly one worker's memory, so every request of a session must reach
the backend that opened it. This table remembers that, forgets sessions when they expire,
and picks the least-loaded backend for a new session. Thread-safe and torch-free; the
clock is injectable so expiry can be tested without waiting. The session headers the bindings
come from are read with ``llava_sessions.wire.parse_session_header``.
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Callable, Collection


class SessionRoutes:
    def __init__(self, n_backends: int, clock: Callable[[], float] = time.time):
        if n_backends < 1:
            raise ValueError(f"n_backends must be at least 1, got {n_backends}")
        self.n_backends = n_backends
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[int, float]] = {}  # id -> (backend, expires_at)
        # (expires_at, id), possibly stale after a rebind or unbind: checked against _routes on pop.
        self._expiry_heap: list[tuple[float, str]] = []
        self._counts = [0] * n_backends
        self._next = 0  # where the round-robin tie-break starts

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._routes)

    def pick_backend(self, exclude: Collection[int] = ()) -> int | None:
        """The backend with the fewest live sessions, ties round-robin; None if all are excluded."""
        with self._lock:
            self._expire_locked()
            order = [(self._next + step) % self.n_backends for step in range(self.n_backends)]
            order = [backend for backend in order if backend not in exclude]
            if not order:
                return None
            chosen = min(order, key=lambda backend: self._counts[backend])  # first of the fewest
            self._next = (chosen + 1) % self.n_backends
            return chosen

    def bind(self, session_id: str, backend: int, expires_at: float) -> None:
        """Remember that ``backend`` holds the session until ``expires_at`` (a rebind moves it)."""
        if not 0 <= backend < self.n_backends:
            raise ValueError(f"backend must be from 0 to {self.n_backends - 1}, got {backend}")
        with self._lock:
            self._drop(session_id)
            self._routes[session_id] = (backend, expires_at)
            self._counts[backend] += 1
            heapq.heappush(self._expiry_heap, (expires_at, session_id))
            self._expire_locked()
            if len(self._expiry_heap) > 2 * len(self._routes) + 64:
                # Closed sessions leave stale entries until their expiry time: without this the
                # heap grows with opens x TTL (a soak of 10,000 cycles showed ~180 B each).
                self._expiry_heap = [(at, sid) for sid, (_, at) in self._routes.items()]
                heapq.heapify(self._expiry_heap)

    def lookup(self, session_id: str) -> int | None:
        with self._lock:
            self._expire_locked()
            route = self._routes.get(session_id)
            return None if route is None else route[0]

    def unbind(self, session_id: str) -> int | None:
        """Forget the session; the backend that held it, or None if it was unknown or expired."""
        with self._lock:
            self._expire_locked()
            return self._drop(session_id)

    def expire(self) -> int:
        """Forget every session past its expiry; how many were dropped."""
        with self._lock:
            return self._expire_locked()

    def counts(self) -> list[int]:
        """Live sessions per backend."""
        with self._lock:
            self._expire_locked()
            return list(self._counts)

    def _drop(self, session_id: str) -> int | None:
        route = self._routes.pop(session_id, None)
        if route is None:
            return None
        self._counts[route[0]] -= 1
        return route[0]

    def _expire_locked(self) -> int:
        # Same rule as the worker's session store: expired at expires_at, not after it.
        now = self._clock()
        dropped = 0
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            expires_at, session_id = heapq.heappop(self._expiry_heap)
            route = self._routes.get(session_id)
            if route is not None and route[1] == expires_at:
                self._drop(session_id)
                dropped += 1
        return dropped

