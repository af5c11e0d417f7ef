"""The bearer-token front (plumbing.authproxy, `rrp auth-proxy`) before a real gRPC server on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plumbing import errors
from plumbing.authproxy import AuthProxyConfig, create_auth_proxy
from plumbing.bootstrap import RunningServer, ServerConfig, create_server

TOKEN = "a-shared-token-from-a-secret-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def _upstream() -> RunningServer:
    """Answers with the metadata keys it got; `Fail` answers NOT_FOUND; `Count` streams N messages."""

    def keys(request: bytes, context: grpc.ServicerContext) -> bytes:
        return ",".join(sorted(k for k, _ in context.invocation_metadata())).encode()

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        raise AssertionError

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    def register(server: grpc.Server) -> tuple[str, ...]:
        handlers = {
            "Keys": grpc.unary_unary_rpc_method_handler(keys),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("rrp.test.Up", handlers),))
        return ("rrp.test.Up",)

    return create_server(ServerConfig(), register)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[str]:
    upstream = _upstream()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    front, channel = create_auth_proxy(
        AuthProxyConfig(server=ServerConfig(), upstream=f"127.0.0.1:{upstream.port}", token_file=token)
    )
    try:
        yield f"127.0.0.1:{front.port}"
    finally:
        front.stop(0)
        channel.close()
        upstream.stop(0)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("x-request-id", "r1"))


def test_callers_with_the_token_reach_the_server_and_the_token_stays_at_the_front(proxy: str) -> None:
    with grpc.insecure_channel(proxy) as channel:
        keys = channel.unary_unary("/rrp.test.Up/Keys")(b"", metadata=_bearer(TOKEN), timeout=5).decode()
        assert "x-request-id" in keys.split(",") and "authorization" not in keys
        streamed = list(channel.unary_stream("/rrp.test.Up/Count")(b"3", metadata=_bearer(TOKEN), timeout=5))
        assert streamed == [b"0", b"1", b"2"]
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/rrp.test.Up/Fail")(b"", metadata=_bearer(TOKEN), timeout=5)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such model")


@pytest.mark.parametrize(
    "metadata", [(), _bearer("wrong-token-of-the-same-kind-0123456789"), (("authorization", TOKEN),)]
)
def test_callers_without_the_token_are_refused(proxy: str, metadata: tuple[tuple[str, str], ...]) -> None:
    with grpc.insecure_channel(proxy) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/rrp.test.Up/Keys")(b"", metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_front_answers_its_own_health_without_a_token(proxy: str) -> None:
    with grpc.insecure_channel(proxy) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_a_short_or_missing_token_file_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(errors.InvalidArgument, match="16"):
        create_auth_proxy(AuthProxyConfig(token_file=short))
    with pytest.raises(errors.FailedPrecondition):
        create_auth_proxy(AuthProxyConfig(token_file=tmp_path / "absent"))


def test_the_rrp_command_parses_what_the_chart_renders() -> None:
    from rrp.cli import build_parser

    args = ["auth-proxy", "--host", "0.0.0.0", "--port", "7070", "--upstream", "127.0.0.1:7080", "--token-file",
            "/var/run/secrets/rrp/model-token/token"]  # fmt: skip
    parsed = build_parser(args).parse_args(args)
    assert (parsed.port, parsed.upstream, str(parsed.token_file)) == (7070, "127.0.0.1:7080", args[-1])
    out = subprocess.run([sys.executable, "-m", "rrp.cli", "auth-proxy", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert "--token-file" in out.stdout
