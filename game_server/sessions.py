"""Session bookkeeping: independent worlds on one server, with a limit and idle expiry."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from game_server.core.state import SimState
from game_server.core.track import Track
from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted


class StateFeed:
    """A session's newest state, for its watchers; the session publishes without ever waiting for one.

    The state and its version are replaced together as one tuple (a single reference swap), so a watcher reads
    them without a lock. Watchers wait on a condition that the publisher notifies only when it can take its
    lock at once; a watcher that misses a notification sees the new version at its next poll.
    """

    POLL_S = 0.05  # the longest a watcher waits for a state it was not told of

    def __init__(self, state: SimState) -> None:
        self._latest: tuple[int, SimState] = (0, state)
        self._changed = threading.Condition(threading.Lock())
        self._count_lock = threading.Lock()
        self.watchers = 0
        self.closed = False

    def latest(self) -> tuple[int, SimState]:
        """(version, state): the version counts the states published so far."""
        return self._latest

    def publish(self, state: SimState) -> None:
        self._latest = (self._latest[0] + 1, state)
        if self.watchers and self._changed.acquire(blocking=False):
            try:
                self._changed.notify_all()
            finally:
                self._changed.release()

    def wait_newer(self, version: int, timeout_s: float) -> tuple[int, SimState]:
        """The newest (version, state) once its version differs from `version`, the feed closes or time runs out."""
        deadline = time.monotonic() + timeout_s
        while self._latest[0] == version and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with self._changed:
                if self._latest[0] == version and not self.closed:
                    self._changed.wait(min(left, self.POLL_S))
        return self._latest

    @contextmanager
    def watching(self, limit: int, session_id: str) -> Iterator[None]:
        """Counts one watcher for the block; RESOURCE_EXHAUSTED past `limit`."""
        with self._count_lock:
            if self.watchers >= limit:
                raise ResourceExhausted(f"session {session_id} already has its maximum of {limit} watchers")
            self.watchers += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.watchers -= 1

    def close(self) -> None:
        """The session is gone: watchers end their streams after its last state."""
        self.closed = True
        with self._changed:
            self._changed.notify_all()


class Session:
    """One world: a track, the current state and how its frames are rendered.

    Every new state goes through `state`'s setter to the session's feed, which watchers read (WatchSession).
    """

    def __init__(self, session_id: str, track: Track, state: SimState, frame_spec: Any, last_used: float) -> None:
        self.session_id = session_id
        self.track = track
        self.frame_spec = frame_spec
        self.last_used = last_used
        self.feed = StateFeed(state)
        self._lock = threading.Lock()

    @property
    def state(self) -> SimState:
        return self.feed.latest()[1]

    @state.setter
    def state(self, state: SimState) -> None:
        self.feed.publish(state)

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

    def oldest(self) -> Session:
        """The session opened first of those still open (the first car of a race); NOT_FOUND when none is."""
        self.expire_idle()
        with self._lock:
            session = next(iter(self._sessions.values()), None)
        if session is None:
            raise NotFound("no session is open on this server")
        return session

    def touch(self, session: Session) -> None:
        session.last_used = self._clock()

    def close(self, session_id: str) -> None:
        self.get(session_id)
        with self._lock:
            closed = self._sessions.pop(session_id, None)
        if closed is not None:
            closed.feed.close()

    def expire_idle(self) -> int:
        """Drops sessions idle for longer than the timeout, unless a call holds them."""
        now = self._clock()
        with self._lock:
            stale = [
                s.session_id
                for s in self._sessions.values()
                if now - s.last_used > self.idle_timeout_s and not s._lock.locked()
            ]
            expired = [self._sessions.pop(sid) for sid in stale]
        for session in expired:
            session.feed.close()
        return len(stale)
