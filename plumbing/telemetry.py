"""OpenTelemetry tracing: spans for every RPC, exported over OTLP only when an endpoint is configured."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import grpc

log = logging.getLogger(__name__)

_lock = threading.Lock()
_provider: Any = None


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

    return [server_interceptor(tracer_provider=provider)]


def instrument_channel(channel: grpc.Channel, service_name: str = "rrp-client") -> grpc.Channel:
    """Wraps a client channel so calls create spans and carry W3C trace context in their metadata."""
    provider = tracer_provider(service_name)
    if provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor, intercept_channel

    # The instrumentation's own interceptor type, which only its own intercept_channel accepts.
    return intercept_channel(channel, client_interceptor(tracer_provider=provider))


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
