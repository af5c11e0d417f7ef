"""gRPC health check for an image's HEALTHCHECK and the chart's test pods: exit 0 when the server is SERVING."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plumbing.channels import ClientTLS, channel_credentials, open_channel
from plumbing.errors import DomainError


def check(address: str, service: str, timeout_s: float, tls: ClientTLS | None = None) -> int:
    with open_channel(address, tls) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return int(response.status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    default_address = f"127.0.0.1:{os.environ.get('RRP_PORT', '50051')}"
    parser.add_argument("--address", default=default_address, help="host:port (default 127.0.0.1:$RRP_PORT)")
    parser.add_argument("--service", default="", help="service name; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per check")
    parser.add_argument("--wait", type=float, default=0.0, help="keep trying for this many seconds")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: check over TLS")
    parser.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-client-key", type=Path, help="PEM key of --tls-client-cert")
    parser.add_argument("--tls-server-name", default="", help="name the server's certificate must carry")
    args = parser.parse_args()
    tls = ClientTLS(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
    try:
        if tls.enabled:
            channel_credentials(tls)  # a missing or bad file: a clear message, not a failing check each period
    except DomainError as exc:
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status = check(args.address, args.service, args.timeout, tls)
            if status == health_pb2.HealthCheckResponse.SERVING:
                print(f"{args.address} {args.service or '(server)'}: SERVING")
                return 0
            problem = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as exc:
            problem = f"{exc.code().name}: {exc.details()}"
        if time.monotonic() >= deadline:
            print(f"{args.address} {args.service or '(server)'}: {problem}", file=sys.stderr)
            return 1
        time.sleep(0.5)


if __name__ == "__main__":
    raise SystemExit(main())
