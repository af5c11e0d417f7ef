"""Session bookkeeping: independent worlds on one server, with a limit and idle expiry."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from game_server.core.state import SimState
from game_server.core.track import Track
from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


@dataclass
class Session:
    """One world: a track, the current state and how its frames are rendered."""

    session_id: str
    track: Track
    state: SimState
    frame_spec: Any
    last_used: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def exclusive(self, what: str) -> Iterator[Session]:
        """Holds the session for one call; a concurrent call gets FAILED_PRECONDITION instead of waiting."""
        if not self._lock.acquire(blocking=False):
            raise FailedPrecondition(f"session {self.session_id} is busy with another call; {what} refused")
        try:
            yield self
        finally:
            self._lock.release()


class SessionStore:
    """Creates, finds and expires sessions; thread-safe."""

    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(self, track: Track, frame_spec: Any) -> Session:
        self.expire_idle()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"server holds its maximum of {self.max_sessions} sessions; close one or retry later"
                )
            session_id = secrets.token_hex(8)
            session = Session(session_id, track, track.base_state, frame_spec, self._clock())
            self._sessions[session_id] = session
            return session

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise InvalidArgument("session_id is required")
        if len(session_id) > 64:
            raise InvalidArgument("session_id is too long")
        self.expire_idle()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"unknown session {session_id!r} (closed or expired)")
            session.last_used = self._clock()
            return session

    def touch(self, session: Session) -> None:
        session.last_used = self._clock()

    def close(self, session_id: str) -> None:
        self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)

    def expire_idle(self) -> int:
        """Drops sessions idle for longer than the timeout, unless a call holds them."""
        now = self._clock()
        with self._lock:
            stale = [
                s.session_id
                for s in self._sessions.values()
                if now - s.last_used > self.idle_timeout_s and not s._lock.locked()
            ]
            for sid in stale:
                del self._sessions[sid]
        return len(stale)
