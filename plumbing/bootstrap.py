"""The one server bootstrap every service uses: health, reflection, error mapping, tracing, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plumbing import errors, telemetry
from plumbing.settings import setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings shared by every service."""

    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 for every interface (in a pod)")
    port: int = setting(0, "port to listen on; 0 takes any free one")
    max_workers: int = setting(16, "RPC worker threads", flag="workers", env="workers")
    max_message_bytes: int = setting(8 * 1024 * 1024, "largest request or response message, bytes")
    grace_s: float = setting(5.0, "seconds in-flight calls get to finish after SIGTERM")
    service_name: str = setting("rrp", "name in logs and traces", cli=False)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a domain error carries; INTERNAL for anything else."""
    return grpc.StatusCode[errors.status_name(exc)]


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.DomainError):
        context.abort(status_of(exc), str(exc))
    if not context.is_active():  # the client cancelled or its deadline passed: nobody to answer
        log.debug("%s ended after the client left: %r", method, exc)
        return
    # Anything else is a bug: log it here, send the client no traceback.
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes in one place, so servicers stay thin."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(fn: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return fn(request, context)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    _abort(context, exc, method)

            return inner

        def wrap_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(request, context)
                except Exception as exc:
                    if _is_abort(exc):
                        raise
                    _abort(context, exc, method)

            return inner

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **kwargs)
        return handler


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare, argument-less Exception after setting the status: let it through.
    return type(exc) is Exception and not exc.args


@dataclass
class RunningServer:
    """A started server with its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    config: ServerConfig

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace_s: float | None = None) -> None:
        """Reports NOT_SERVING first so that balancers drain, then lets in-flight calls finish."""
        self.set_serving(False)
        self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        telemetry.shutdown()


def create_server(
    config: ServerConfig,
    register: Callable[[grpc.Server], Sequence[str]],
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> RunningServer:
    """Builds and starts a server; `register` adds the servicers and returns their full service names."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    chain = [*telemetry.server_interceptors(config.service_name), ErrorMappingInterceptor(), *interceptors]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix=config.service_name),
        options=options,
        interceptors=chain,
        maximum_concurrent_rpcs=config.max_workers * 8,
    )
    names = tuple(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    running = RunningServer(server, port, health_servicer, names, config)
    running.set_serving(True)
    log.info("%s listening on %s:%d", config.service_name, config.host, port)
    return running


def serve_until_signal(running: RunningServer, on_stop: Callable[[], None] | None = None) -> None:
    """Blocks until SIGTERM or SIGINT, then shuts down gracefully."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()
    running.stop()
    if on_stop is not None:
        on_stop()
    log.info("%s stopped", running.config.service_name)
