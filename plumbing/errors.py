"""Domain errors, each carrying the gRPC status it maps to, so no layer needs a server to map one."""

from __future__ import annotations

from typing import ClassVar

MAX_QUOTE_CHARS = 64


class DomainError(Exception):
    """Base class: the message is safe to show to a client; `code` names its gRPC status."""

    code: ClassVar[str] = "INTERNAL"


class InvalidArgument(DomainError):
    """Malformed or out-of-range input."""

    code = "INVALID_ARGUMENT"


class NotFound(DomainError):
    """An unknown session, track, run or model."""

    code = "NOT_FOUND"


class FailedPrecondition(DomainError):
    """A call made out of order."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(DomainError):
    """A limit was reached."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    """A dependency is down; the call may be retried."""

    code = "UNAVAILABLE"


class DeadlineExceeded(DomainError):
    """The work outlived the time it was given."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(DomainError):
    """The caller left, so the work stopped."""

    code = "CANCELLED"


def status_name(exc: BaseException) -> str:
    """The gRPC status name for an exception: its own for a DomainError, INTERNAL for anything else."""
    return exc.code if isinstance(exc, DomainError) else "INTERNAL"


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """A short, printable prefix of untrusted input, so that an error never echoes megabytes back."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} chars)"
    return repr(text)
