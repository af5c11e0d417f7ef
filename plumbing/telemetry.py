"""OpenTelemetry tracing: spans for every RPC, exported over OTLP only when an endpoint is configured."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

log = logging.getLogger(__name__)

_lock = threading.Lock()
_provider: Any = None

# Calls that poll a server's state, every second or so from every client: traced, they outnumber the work
# (a traced GA run had 18 spans of health checks and server info among 74). Neither side traces them.
UNTRACED_METHODS = (
    "/grpc.health.v1.Health/",
    "/rallyrobopilot.v1.GameService/GetServerInfo",
    "/rallyrobopilot.v1.SchedulerService/GetPoolStatus",
)


def is_traced(call_details: Any) -> bool:
    """Whether a call gets a span; takes a server's HandlerCallDetails or the instrumentation's client info."""
    method = getattr(call_details, "method", None) or getattr(call_details, "full_method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return not str(method).startswith(UNTRACED_METHODS)


def tracing_enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def tracer_provider(service_name: str) -> Any:
    """The process's tracer provider with an OTLP/gRPC exporter, or None when tracing is off."""
    global _provider
    if not tracing_enabled():
        return None
    with _lock:
        if _provider is None:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
            # Our own exit hook flushes with a bound; the SDK's would wait up to 30 s for a collector.
            provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            atexit.register(shutdown)
            trace.set_tracer_provider(provider)
            _provider = provider
            log.info("tracing on: exporting spans over OTLP to %s", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return _provider


def server_interceptors(service_name: str) -> list[grpc.ServerInterceptor]:
    provider = tracer_provider(service_name)
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(tracer_provider=provider, filter_=is_traced)]


def instrument_channel(channel: grpc.Channel, service_name: str = "rrp-client") -> grpc.Channel:
    """Wraps a client channel so calls create spans and carry W3C trace context in their metadata."""
    provider = tracer_provider(service_name)
    if provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor, intercept_channel

    # The instrumentation's own interceptor type, which only its own intercept_channel accepts.
    return intercept_channel(channel, client_interceptor(tracer_provider=provider, filter_=is_traced))


@contextlib.contextmanager
def root_span(
    name: str, attributes: Mapping[str, str | int | float | bool] | None = None, service_name: str = "rrp"
) -> Iterator[None]:
    """A new trace whose root span is current while the block runs, when tracing is on: one unit of work (a GA
    generation), so that every call made inside it, on any thread that carries the context, joins its tree."""
    provider = tracer_provider(service_name)
    if provider is None:
        yield
        return
    from opentelemetry.context import Context

    tracer = provider.get_tracer("rrp")
    with tracer.start_as_current_span(name, context=Context(), attributes=dict(attributes or {})):
        yield


def shutdown(timeout_s: float = 3.0) -> None:
    """Flushes pending spans for at most `timeout_s`; called on graceful shutdown.

    Spans are best effort: a collector that is slow or gone must not hold a stopping process past its grace
    period (the exporter alone may retry for its whole timeout)."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is None:
        return
    done = threading.Thread(target=lambda: (provider.force_flush(int(timeout_s * 1000)), provider.shutdown()),
                            daemon=True, name="telemetry-shutdown")  # fmt: skip
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        log.warning("tracing: spans not flushed within %.1f s; dropping them", timeout_s)
