"""A gRPC front that admits only callers with the shared bearer token and forwards their calls to a local server.

TorchServe makes its own token keys at random in each process, so its replicas cannot share one and clients in
other pods cannot learn it. In a pod, TorchServe listens on loopback only and this front holds the pod's port: it
checks `authorization: Bearer <token>` (the token from a Secret, a file) in constant time, answers UNAUTHENTICATED
otherwise, and forwards every method byte for byte (messages are not decoded), with the caller's deadline.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from plumbing import errors
from plumbing.bootstrap import RunningServer, ServerConfig, create_server, serve_until_signal
from plumbing.channels import open_channel
from plumbing.settings import nested, setting

log = logging.getLogger(__name__)

# Answered by the front itself (its probes, its reflection), never forwarded nor asked for the token.
_OWN = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_DROPPED_HEADERS = ("authorization",)


@dataclass(frozen=True)
class AuthProxyConfig:
    """Where the front listens, what it forwards to, and the token callers must send."""

    server: ServerConfig = nested(lambda: ServerConfig(port=7070, service_name="auth-proxy", max_streams=1024))
    upstream: str = setting("127.0.0.1:7080", "the server to forward to (TorchServe's gRPC port on loopback)")
    token_file: Path = setting(Path("token"), "file holding the shared token callers send as a bearer token")


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise errors.FailedPrecondition(f"token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise errors.InvalidArgument(f"token file {path}: a token of at least 16 characters is needed")
    return token


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.channel = channel
        self.expected = f"Bearer {token}".encode()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method.startswith(_OWN):
            return None
        # Every kind of call forwards as a stream: on the wire a unary call is a stream of one message each way.
        call = self.channel.stream_stream(method)

        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            metadata = tuple(context.invocation_metadata())
            sent = next((str(v) for k, v in metadata if k == "authorization"), "")
            if not hmac.compare_digest(sent.encode(), self.expected):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
            passed = tuple((k, v) for k, v in metadata if k not in _DROPPED_HEADERS and not k.startswith("grpc-"))
            upstream = call(requests, timeout=context.time_remaining(), metadata=passed)
            context.add_callback(upstream.cancel)
            try:
                yield from upstream
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNAVAILABLE
                context.abort(code, exc.details() if hasattr(exc, "details") else str(exc))

        return grpc.stream_stream_rpc_method_handler(forward)


def create_auth_proxy(config: AuthProxyConfig) -> tuple[RunningServer, grpc.Channel]:
    """The started front and its channel to the upstream (close both to stop)."""
    token = read_token(config.token_file)
    limits: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.server.max_message_bytes),
        ("grpc.max_send_message_length", config.server.max_message_bytes),
    ]
    channel = open_channel(config.upstream, options=limits)

    def register(server: grpc.Server) -> tuple[str, ...]:
        server.add_generic_rpc_handlers((_Forward(channel, token),))
        return ()

    return create_server(config.server, register), channel


def run(config: AuthProxyConfig) -> None:
    running, channel = create_auth_proxy(config)
    log.info("forwarding to %s, bearer token required", config.upstream)
    serve_until_signal(running, on_stop=channel.close)
