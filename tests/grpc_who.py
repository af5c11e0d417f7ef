"""A tiny gRPC server that answers its host's name, and a client that counts who answered (round-robin tests).

`python tests/grpc_who.py serve NAME PORT [CERT KEY]`: logs "listening on"; `/rrp.test.Who/Name` answers NAME.
`python tests/grpc_who.py ask TARGET REPLICAS CALLS [CA]`: once calls have reached REPLICAS servers (each connects
in its own time: round robin only picks ready ones), makes CALLS calls and prints {"NAME": calls answered} as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from plumbing.bootstrap import ServerConfig, create_server, serve_until_signal
from plumbing.channels import ClientTLS, open_channel

METHOD = "/rrp.test.Who/Name"


def serve(name: str, port: int, cert: Path | None, key: Path | None) -> None:
    def register(server: grpc.Server) -> tuple[str, ...]:
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rrp.test.Who", {"Name": handler}),))
        return ("rrp.test.Who",)

    config = ServerConfig(host="0.0.0.0", port=port, service_name=name, tls_cert_file=cert, tls_key_file=key)
    serve_until_signal(create_server(config, register))


def ask(address: str, replicas: int, calls: int, ca: Path | None) -> None:
    answered: Counter[str] = Counter()
    with open_channel(address, ClientTLS(ca_file=ca)) as channel:
        call = channel.unary_unary(METHOD)
        deadline = time.monotonic() + 30
        seen = set()
        while len(seen) < replicas and time.monotonic() < deadline:
            seen.add(call(b"", timeout=10, wait_for_ready=True).decode())
        for _ in range(calls):
            answered[call(b"", timeout=10, wait_for_ready=True).decode()] += 1
    print(json.dumps(answered), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    args = sys.argv[1:]
    if args[0] == "serve":
        tls = (Path(args[3]), Path(args[4])) if len(args) > 3 else (None, None)
        serve(args[1], int(args[2]), *tls)
    else:
        ask(args[1], int(args[2]), int(args[3]), Path(args[4]) if len(args) > 4 else None)
