"""Every gRPC client over TLS, with certificates made here: the game client, the scheduler's pool, the game server's
recording stream to a collector, and the inference client through a TLS `rrp auth-proxy`; refusals and bad files."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from collector.server import CollectorConfig, CollectorServer, create_collector_server
from collector.store import RedisConfig
from game_server.client import GameClient
from game_server.core import drivers
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing import errors
from plumbing.authproxy import AuthProxyConfig, create_auth_proxy
from plumbing.bootstrap import ServerConfig
from plumbing.channels import ClientTLS
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2, game_pb2, game_pb2_grpc, sim_pb2
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.tasks import LapTask
from serving.client import ModelRef, connect
from serving.codec import N_LOGITS, encode_response
from serving.replicas import Replicas, connect_replicas
from serving.torchserve_v1 import inference_pb2, inference_pb2_grpc
from tests.test_collector_tls import OPENSSL
from tests.test_grpc_tls import Certs, make_certs

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command to make test certificates")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "a-shared-inference-token-0123456789abcdef"
# Names only, no IP: a client that dials an IP a name resolved to must still check the certificate for the name.
SANS = "DNS:localhost,DNS:game.test,DNS:model.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"), sans=SANS)


def _mutual(certs: Certs) -> ClientTLS:
    return ClientTLS(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)


def _tls_server(certs: Certs, port: int = 0) -> ServerConfig:
    """A mutual-TLS port: the server's certificate, and clients must show one the same CA signed."""
    return ServerConfig(
        port=port, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.ca
    )


@pytest.fixture(scope="module")
def game(certs: Certs) -> Iterator[GameServer]:
    server = create_game_server(GameServerConfig(server=_tls_server(certs), collector_tls=_mutual(certs)))
    yield server
    server.stop(0)


def test_the_game_client_drives_a_session_over_mutual_tls(game: GameServer, certs: Certs) -> None:
    with GameClient(f"localhost:{game.port}", 10.0, _mutual(certs)) as client:
        assert "oval" in {t.name for t in client.list_tracks()}
        with client.session("oval") as created:  # a stateful session: every call reaches the same server
            client.reset(created.session_id)
            assert client.step(created.session_id, b"\x01" * 5).state.tick == 5


@pytest.mark.parametrize("who", ["plaintext", "no-client-certificate", "other-ca"])
def test_the_game_client_is_refused_without_the_right_credentials(game: GameServer, certs: Certs, who: str) -> None:
    tls = {
        "plaintext": None,
        "no-client-certificate": ClientTLS(ca_file=certs.ca),
        "other-ca": ClientTLS(ca_file=certs.other_ca, cert_file=certs.client_cert, key_file=certs.client_key),
    }[who]
    with GameClient(f"localhost:{game.port}", 5.0, tls) as client, pytest.raises(grpc.RpcError) as err:
        client.list_tracks()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_pool_evaluates_on_a_discovered_tls_server_checking_the_discovered_name(
    game: GameServer, certs: Certs
) -> None:
    # The headless name resolves to the pod's IP, which the certificate does not carry: the pool checks the name.
    config = PoolConfig(discover=f"game.test:{game.port}", tls=_mutual(certs), discover_interval_s=60.0)
    with EvaluationPool(config, resolver=lambda host, port: [f"127.0.0.1:{port}"]) as pool:
        assert pool.client_tls is not None and pool.client_tls.server_name == "game.test"
        pool.wait_ready(1, timeout_s=30.0)
        task = LapTask("oval", max_ticks=50)
        assert list(pool.map(task, [b"\x01" * 50])) == [task(b"\x01" * 50)]


@pytest.fixture
def tls_collector(certs: Certs, tmp_path: Path) -> Iterator[CollectorServer]:
    with LocalRedis(tmp_path / "redis") as redis:
        server = create_collector_server(CollectorConfig(redis=RedisConfig(url=redis.url), server=_tls_server(certs)))
        yield server
        server.stop(0)


def test_the_game_server_records_to_a_mutual_tls_collector(
    game: GameServer, certs: Certs, tls_collector: CollectorServer
) -> None:
    d = drivers.default_driver()
    record = game_pb2.RecordRequest(
        run_id="over-tls",
        track="oval",
        driver=sim_pb2.DriverParams(kind=d.kind, params=d.params),
        max_ticks=5,
        frame_options=sim_pb2.FrameOptions(width_px=32, height_px=24),
        encoding=collector_pb2.IMAGE_ENCODING_RAW_RGB,
        collector_address=f"localhost:{tls_collector.port}",
    )
    with GameClient(f"localhost:{game.port}", 60.0, _mutual(certs)) as client:
        assert game_pb2_grpc.GameServiceStub(client.channel).Record(record, timeout=60).frames == 5


class _Model(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """TorchServe's inference API as a model server answers it: logits and keys for one frame."""

    def Predictions(self, request, context):  # type: ignore[no-untyped-def]
        return inference_pb2.PredictionResponse(prediction=encode_response(np.arange(N_LOGITS, dtype=np.float32), 5))


@pytest.fixture
def tls_front(certs: Certs, tmp_path: Path) -> Iterator[int]:
    """`rrp auth-proxy` serving TLS in front of a model server on loopback, as each TorchServe pod runs it."""
    model = grpc.server(futures.ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(_Model(), model)
    upstream = model.add_insecure_port("127.0.0.1:0")
    model.start()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    tls = ServerConfig(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    front, channel = create_auth_proxy(AuthProxyConfig(server=tls, upstream=f"127.0.0.1:{upstream}", token_file=token))
    yield front.port
    front.stop(0)
    channel.close()
    model.stop(0)


def test_the_inference_client_reaches_replicas_through_a_tls_front(tls_front: int, certs: Certs) -> None:
    frame = np.zeros((24, 32, 3), np.uint8)
    # A replica dialled by the IP its name resolved to: the certificate is checked for the name.
    replicas = Replicas((f"model.test:{tls_front}",), resolve=lambda address: [f"127.0.0.1:{tls_front}"])
    client = connect_replicas("torchserve", replicas, ModelRef("m"), lambda address: TOKEN, ClientTLS(ca_file=certs.ca))
    try:
        assert client.infer(frame, 1.0, 5.0).keys == 5
    finally:
        client.close()
        replicas.close()
    plain = connect("torchserve", f"localhost:{tls_front}", ModelRef("m"), TOKEN)
    try:
        with pytest.raises(errors.Unavailable):
            plain.infer(frame, 1.0, 5.0)
    finally:
        plain.close()


def test_bad_client_tls_files_fail_at_once_with_their_name(certs: Certs, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(errors.FailedPrecondition, match=r"missing-ca\.pem"):
        GameClient("localhost:1", tls=ClientTLS(ca_file=tmp_path / "missing-ca.pem"))
    with pytest.raises(errors.InvalidArgument, match="--tls-ca: not a PEM file"):
        GameClient("localhost:1", tls=ClientTLS(ca_file=not_pem))
    with pytest.raises(errors.InvalidArgument, match="needs --tls-ca"):
        GameClient("localhost:1", tls=ClientTLS(cert_file=certs.client_cert, key_file=certs.client_key))
    with pytest.raises(errors.FailedPrecondition, match=r"missing-key\.pem"):
        EvaluationPool(PoolConfig(servers=("localhost:1",), tls=ClientTLS(certs.ca, certs.client_cert,
                                                                          tmp_path / "missing-key.pem")))  # fmt: skip


def test_rrp_commands_report_a_missing_tls_file_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    argv = [sys.executable, "-m", "rrp.cli", "scheduler", "--port", "0", "--servers", "localhost:1",
            "--tls-ca", str(missing)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "rrp scheduler: error: TLS file" in done.stderr and "missing-ca.pem" in done.stderr
    assert "Traceback" not in done.stderr
