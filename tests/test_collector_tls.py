"""The collector against a real TLS-only redis-server: rediss:// with a private CA, and a wrong or missing CA."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.server import CollectorConfig, create_collector_server
from collector.store import FrameStore, RedisConfig
from plumbing import errors
from plumbing.bootstrap import ServerConfig
from plumbing.procs import start_service
from plumbing.redis_local import LocalRedis
from tests.test_collector import assert_exactly_once, produce, run_start

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command to make test certificates")


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def make_pki(d: Path) -> Pki:
    """A throwaway CA, a server certificate it signs for 127.0.0.1 and localhost, and an unrelated CA."""
    ca, ca_key = _make_ca(d, "ca")
    other_ca, _ = _make_ca(d, "other-ca")
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext)  # fmt: skip
    key.chmod(0o600)
    return Pki(ca=ca, cert=cert, key=key, other_ca=other_ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalRedis]:
    server = LocalRedis(
        tmp_path_factory.mktemp("redis-tls"), tls_cert_file=pki.cert, tls_key_file=pki.key, tls_ca_file=pki.ca
    )
    with server:
        yield server
    assert server.proc is not None and server.proc.poll() is not None  # stopped


def test_local_redis_listens_for_tls_only(tls_redis: LocalRedis, pki: Pki) -> None:
    assert tls_redis.url.startswith("rediss://127.0.0.1:")
    assert tls_redis.client().ping()
    assert tls_redis.client().config_get("port") == {"port": "0"}  # no plaintext listener


def test_collector_cli_streams_a_run_into_redis_over_tls(tls_redis: LocalRedis, pki: Pki) -> None:
    proc = start_service(["collector", "--port", "0", "--redis", tls_redis.url, "--redis-tls-ca", str(pki.ca)])
    try:
        start = run_start()
        stats = produce(proc.address, start, 60)
        assert (stats.frames, stats.acked, stats.duplicates, stats.stored_frames) == (60, 60, 0, 60)
    finally:
        assert proc.stop() == 0
    assert "answers" in "\n".join(proc.lines)  # the startup PING went through TLS
    store = FrameStore.connect(RedisConfig(url=tls_redis.url, tls_ca_file=pki.ca))
    assert_exactly_once(store, start.run_id, 60)


@pytest.mark.parametrize(
    ("case", "reason"),
    [("no CA", "certificate verify failed"), ("wrong CA", "certificate verify failed"), ("plaintext", "reset|closed")],
)
def test_an_unusable_tls_setup_is_unavailable_not_a_hang(
    tls_redis: LocalRedis, pki: Pki, case: str, reason: str
) -> None:
    if case == "plaintext":  # redis:// against the TLS port
        config = RedisConfig(url=tls_redis.url.replace("rediss://", "redis://"), connect_timeout_s=1)
    else:
        config = RedisConfig(url=tls_redis.url, tls_ca_file=pki.other_ca if case == "wrong CA" else None)
    with pytest.raises(errors.Unavailable, match=reason):
        FrameStore.connect(config).ping()
    server = create_collector_server(
        CollectorConfig(redis=config, server=ServerConfig(port=0, service_name="collector-tls-test"))
    )
    try:
        with pytest.raises(errors.Unavailable, match=rf"UNAVAILABLE: .*unreachable.*({reason})"):
            produce(server.address, run_start(), 5, reconnect_attempts=1)
    finally:
        server.stop(0.5)
