"""Domain errors that every service maps to one gRPC status code, in one place (`rrp.bootstrap`)."""


class DomainError(Exception):
    """Base class: the message is safe to show to a client."""


class InvalidArgument(DomainError):
    """Malformed or out-of-range input (INVALID_ARGUMENT)."""


class NotFound(DomainError):
    """An unknown session, track, run or model (NOT_FOUND)."""


class FailedPrecondition(DomainError):
    """A call made out of order (FAILED_PRECONDITION)."""


class ResourceExhausted(DomainError):
    """A limit was reached (RESOURCE_EXHAUSTED)."""


class Unavailable(DomainError):
    """A dependency is down; the call may be retried (UNAVAILABLE)."""
