"""The one server bootstrap every service uses: health, reflection, error mapping, tracing, shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from plumbing import errors, telemetry
from plumbing.metrics import MetricsEndpoint, start_metrics
from plumbing.procs import stop_on_signals
from plumbing.settings import setting

log = logging.getLogger(__name__)

# A status message never carries more than this: gRPC refuses trailing metadata over 16 KiB.
MAX_DETAILS_CHARS = 1024
# Threads kept free of all limited work, so that health checks and refusals are always answered at once.
RESERVED_THREADS = 4
# Calls that are never refused for capacity: they cost microseconds and say whether the server lives.
_ALWAYS_ADMITTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings shared by every service."""

    host: str = setting("127.0.0.1", "address to bind; 0.0.0.0 for every interface (in a pod)")
    port: int = setting(0, "port to listen on; 0 takes any free one")
    # Unary calls served at once (health checks and the like aside); more are refused with RESOURCE_EXHAUSTED.
    max_workers: int = setting(
        16,
        "unary calls served at once; more are refused with RESOURCE_EXHAUSTED (health is never refused)",
        flag="workers",
        env="workers",
    )
    max_message_bytes: int = setting(8 * 1024 * 1024, "largest request or response message, bytes")
    grace_s: float = setting(5.0, "seconds in-flight calls get to finish after SIGTERM")
    service_name: str = setting("rrp", "name in logs and traces", cli=False)
    max_streams: int = setting(
        256, "streaming calls served at once; more are refused with RESOURCE_EXHAUSTED (health is never refused)"
    )
    stream_idle_timeout_s: float = setting(
        60.0,
        "a client-streaming call on which no message moved either way for this many seconds is closed"
        " (DEADLINE_EXCEEDED)",
    )
    metrics_port: int = setting(0, "port of the Prometheus metrics endpoint (/metrics, on --host); 0: none")
    # TLS: a certificate and its key (PEM files, e.g. a Kubernetes TLS Secret mounted as files) make the port
    # TLS-only; a client CA on top makes it mutual (clients must show a certificate that CA signed).
    tls_cert_file: Path | None = setting(
        None, "PEM certificate (chain) to serve TLS with (with --tls-key); none: plaintext", flag="tls-cert"
    )
    tls_key_file: Path | None = setting(None, "PEM private key of --tls-cert", flag="tls-key")
    tls_client_ca_file: Path | None = setting(
        None, "PEM CA bundle: clients must present a certificate it signed (mutual TLS)", flag="tls-client-ca"
    )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's files; None for plaintext. Files are read once, at start."""
    cert, key, client_ca = config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file
    if cert is None and key is None:
        if client_ca is not None:
            raise errors.InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise errors.InvalidArgument("TLS needs both --tls-cert and --tls-key")
    try:
        pair = (key.read_bytes(), cert.read_bytes())
        ca = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise errors.FailedPrecondition(f"TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a domain error carries; INTERNAL for anything else."""
    return grpc.StatusCode[errors.status_name(exc)]


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, errors.DomainError):
        context.abort(status_of(exc), _clipped(str(exc)))
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


def _clipped(details: str) -> str:
    """A status message short enough for gRPC's metadata limit, however long the input it names."""
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return details[:MAX_DETAILS_CHARS] + f"... ({len(details)} chars)"


class _Undecodable:
    """Stands for request bytes that do not parse: gRPC would answer INTERNAL for a None."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self) -> str:
        return f"request bytes do not decode as the method's message: {errors.quote(str(self.error))}"


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


class _StreamWatch:
    """Closes streams on which nothing moved for the idle timeout; one thread watches them all."""

    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._active: dict[int, tuple[grpc.ServicerContext, list[float]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, context: grpc.ServicerContext) -> list[float]:
        stamp = [time.monotonic()]
        with self._lock:
            self._active[id(context)] = (context, stamp)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True, name="stream-idle-watch")
                self._thread.start()
        return stamp

    def remove(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._active.pop(id(context), None)

    def _watch(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout_s / 4))
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                idle = [c for c, stamp in self._active.values() if now - stamp[0] > self.idle_timeout_s]
            for context in idle:
                self.remove(context)
                _close_idle(context, self.idle_timeout_s)


def _close_idle(context: grpc.ServicerContext, idle_timeout_s: float) -> None:
    """Ends the call with DEADLINE_EXCEEDED and a reason; the blocked handler then wakes and unwinds."""
    details = f"no message on this stream for {idle_timeout_s:g} s: closed as idle".encode()
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], details)  # type: ignore[union-attr]
    except Exception:
        context.cancel()


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Bounds unary and streaming work separately, closes idle streams, and refuses undecodable bytes.

    Health checks and reflection are always admitted. Each limit is a non-blocking semaphore: a call past
    it is refused at once with RESOURCE_EXHAUSTED, never queued, so no client can make another wait.
    """

    def __init__(self, config: ServerConfig, always_admitted: Sequence[str] = ()) -> None:
        self.config = config
        self._always = (*_ALWAYS_ADMITTED, *always_admitted)
        self._unary = threading.BoundedSemaphore(config.max_workers)
        self._streams = threading.BoundedSemaphore(config.max_streams)
        self._watch = _StreamWatch(config.stream_idle_timeout_s)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        limited = not method.startswith(self._always)
        streaming = bool(handler.request_streaming or handler.response_streaming)
        gate = (self._streams if streaming else self._unary) if limited else None
        limit = self.config.max_streams if streaming else self.config.max_workers
        # Only a stream that waits on its client can be idle: a server-streaming call (MapEvaluate) whose
        # request has arrived is working, however long its first result takes.
        watch = self._watch if handler.request_streaming else None

        def admit(context: grpc.ServicerContext) -> None:
            if gate is not None and not gate.acquire(blocking=False):
                kind = "streams" if streaming else "calls"
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server is serving its maximum of {limit} {kind}; retry later",
                )

        def done() -> None:
            if gate is not None:
                gate.release()

        def requests_of(it: Iterator[Any], stamp: list[float] | None) -> Iterator[Any]:
            for request in it:
                if stamp is not None:
                    stamp[0] = time.monotonic()
                if isinstance(request, _Undecodable):
                    raise errors.InvalidArgument(request.message())
                yield request

        def unary_in(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            return request

        def wrap(fn: Callable[..., Any], request_streaming: bool, response_streaming: bool) -> Callable[..., Any]:
            if response_streaming:

                def stream_out(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    admit(context)
                    stamp = watch.add(context) if watch is not None else None
                    try:
                        arg = requests_of(request, stamp) if request_streaming else unary_in(request, context)
                        for response in fn(arg, context):
                            if stamp is not None:
                                stamp[0] = time.monotonic()
                            yield response
                    finally:
                        if watch is not None:
                            watch.remove(context)
                        done()

                return stream_out

            def unary_out(request: Any, context: grpc.ServicerContext) -> Any:
                admit(context)
                stamp = watch.add(context) if watch is not None else None
                try:
                    arg = requests_of(request, stamp) if request_streaming else unary_in(request, context)
                    return fn(arg, context)
                finally:
                    if watch is not None:
                        watch.remove(context)
                    done()

            return unary_out

        kwargs = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False, False), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False, True), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True, False), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True, True), **kwargs)
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
    metrics: MetricsEndpoint | None = None

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
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.stop()
        telemetry.shutdown()


def create_server(
    config: ServerConfig,
    register: Callable[[grpc.Server], Sequence[str]],
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    always_admitted: Sequence[str] = (),
) -> RunningServer:
    """Builds and starts a server; `register` adds the servicers and returns their full service names.

    `always_admitted` names methods ("/package.Service/Method") as cheap as a health check, which
    schedulers call to decide whether a server is usable: they are never refused for capacity."""
    credentials = server_credentials(config)  # before anything starts: a bad TLS setting fails alone
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    chain = [
        AdmissionInterceptor(config, always_admitted),
        *telemetry.server_interceptors(config.service_name),
        ErrorMappingInterceptor(),
        *interceptors,
    ]
    # Admission bounds the limited work to max_workers + max_streams threads, so that the reserve is always
    # free for health checks and for refusals; gRPC's own concurrency limit would refuse health checks too.
    threads = config.max_workers + config.max_streams + RESERVED_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=config.service_name),
        options=options,
        interceptors=chain,
    )
    names = tuple(register(server))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bind = f"{config.host}:{config.port}"
    port = server.add_insecure_port(bind) if credentials is None else server.add_secure_port(bind, credentials)
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    try:
        metrics = start_metrics(config.host, config.metrics_port, config.service_name)
    except Exception:  # a taken or impossible port: release the gRPC port too
        server.stop(None)
        raise
    server.start()
    running = RunningServer(server, port, health_servicer, names, config, metrics)
    running.set_serving(True)
    log.info("%s listening on %s:%d%s", config.service_name, config.host, port, " (TLS)" if credentials else "")
    return running


def serve_until_signal(running: RunningServer, on_stop: Callable[[], None] | None = None) -> None:
    """Blocks until SIGTERM or SIGINT, then shuts down gracefully."""
    stop = stop_on_signals("the server")
    # Python runs signal handlers in the main thread only. A SIGTERM that the kernel hands to another thread (gRPC's
    # own, say) does not interrupt a wait without a timeout, and the server would never stop: wake up to look.
    while not stop.wait(0.2):
        pass
    running.stop()
    if on_stop is not None:
        on_stop()
    log.info("%s stopped", running.config.service_name)
