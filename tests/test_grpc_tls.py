"""TLS on the gRPC servers (plumbing.bootstrap) and clients (plumbing.channels), with certificates made here."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plumbing import errors
from plumbing.bootstrap import RunningServer, ServerConfig, create_server
from plumbing.channels import ClientTLS, open_channel, target
from tests.test_collector_tls import OPENSSL, _make_ca, _openssl

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command to make test certificates")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _issue(d: Path, name: str, ca: Path, ca_key: Path, usage: str, sans: str) -> tuple[Path, Path]:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nauthorityKeyIdentifier=keyid\n" + (f"subjectAltName={sans}\n" if sans else "")
    )
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)  # fmt: skip
    key.chmod(0o600)
    return cert, key


def make_certs(d: Path, sans: str = "IP:127.0.0.1,DNS:localhost") -> Certs:
    """A CA, a server certificate for `sans`, a client certificate (mutual TLS), and an unrelated CA."""
    ca, ca_key = _make_ca(d, "ca")
    other_ca, _ = _make_ca(d, "other-ca")
    server_cert, server_key = _issue(d, "server", ca, ca_key, "serverAuth", sans)
    client_cert, client_key = _issue(d, "client", ca, ca_key, "clientAuth", "")
    return Certs(ca, server_cert, server_key, client_cert, client_key, other_ca)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server(config: ServerConfig) -> RunningServer:
    return create_server(config, lambda server: ())


@pytest.fixture
def tls_server(certs: Certs) -> Iterator[RunningServer]:
    running = _server(ServerConfig(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key))
    yield running
    running.stop(0)


def _check(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service="")
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def test_a_tls_server_answers_a_client_that_trusts_its_ca(tls_server: RunningServer, certs: Certs) -> None:
    with open_channel(f"localhost:{tls_server.port}", ClientTLS(ca_file=certs.ca)) as channel:
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
    # Through an address its certificate does not name, with the name given apart (a pod IP, say).
    with open_channel(f"127.0.0.1:{tls_server.port}", ClientTLS(ca_file=certs.ca, server_name="localhost")) as channel:
        assert _check(channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("who", ["plaintext", "other-ca", "wrong-name"])
def test_a_tls_server_refuses_plaintext_and_untrusting_clients(
    tls_server: RunningServer, certs: Certs, who: str
) -> None:
    tls = {
        "plaintext": None,
        "other-ca": ClientTLS(ca_file=certs.other_ca),
        "wrong-name": ClientTLS(ca_file=certs.ca, server_name="not-the-server"),
    }[who]
    with open_channel(f"localhost:{tls_server.port}", tls) as channel, pytest.raises(grpc.RpcError) as err:
        _check(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_wants_a_client_certificate_the_ca_signed(certs: Certs) -> None:
    running = _server(
        ServerConfig(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.ca)
    )
    try:
        address = f"localhost:{running.port}"
        good = ClientTLS(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        with open_channel(address, good) as channel:
            assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
        with open_channel(address, ClientTLS(ca_file=certs.ca)) as channel, pytest.raises(grpc.RpcError) as err:
            _check(channel)  # no client certificate
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_bad_tls_settings_fail_with_a_clear_error(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="both"):
        _server(ServerConfig(tls_cert_file=certs.server_cert))
    with pytest.raises(errors.InvalidArgument, match="needs --tls-cert"):
        _server(ServerConfig(tls_client_ca_file=certs.ca))
    with pytest.raises(errors.FailedPrecondition, match=r"missing\.pem"):
        _server(ServerConfig(tls_cert_file=tmp_path / "missing.pem", tls_key_file=certs.server_key))
    with pytest.raises(errors.InvalidArgument, match="both"):
        open_channel("localhost:1", ClientTLS(ca_file=certs.ca, cert_file=certs.client_cert))


def test_targets_resolve_every_address_of_a_name() -> None:
    assert target("game:50051") == "dns:///game:50051"
    assert target("dns:///game:50051") == "dns:///game:50051"
    assert target("ipv4:10.0.0.1:1,10.0.0.2:1") == "ipv4:10.0.0.1:1,10.0.0.2:1"


def test_rrp_game_server_serves_tls_from_its_flags(certs: Certs) -> None:
    """The real command: `rrp game-server --tls-cert --tls-key` (RRP_TLS_CERT and RRP_TLS_KEY work alike)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rrp.cli", "game-server", "--port", "0", "--tls-cert", str(certs.server_cert),
         "--tls-key", str(certs.server_key)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:  # all of its output, to the end: a full pipe would block the server
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(60), "".join(lines)
        line = next(line for line in lines if "listening on" in line)
        assert "(TLS)" in line, line
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        with open_channel(f"localhost:{port}", ClientTLS(ca_file=certs.ca)) as channel:
            assert _check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # every thread's stack, to see where it waits
            time.sleep(1.0)
            proc.kill()
            proc.wait()
            reader.join(5)
            pytest.fail("rrp game-server did not exit within 30 s of SIGTERM:\n" + "".join(lines[-80:]))
    reader.join(5)
