"""Round robin across replicas: one name with two hosts' addresses (a headless Service's A records, through the
hosts files of network namespaces), a client on a third host, and both servers answer its calls, over TLS."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netlab import NetLab
from tests.test_grpc_tls import make_certs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("openssl") is None,
    reason="network namespaces need root and iproute2; certificates need openssl",
)
PORT = 50071
CALLS = 40


@pytest.fixture
def lab() -> Iterator[NetLab]:
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()


def test_a_client_spreads_its_calls_over_every_replica_of_a_name(lab: NetLab, tmp_path: Path) -> None:
    certs = make_certs(tmp_path, sans="DNS:who")  # one certificate for the Service's name, as a pod would mount
    replicas = [lab.add_host(f"who{i}", 10 + i) for i in (1, 2)]
    client = lab.add_host("client", 30)
    lab.set_name("who", replicas)
    who = str(ROOT / "tests" / "grpc_who.py")
    for host in replicas:
        proc = lab.run(host, [sys.executable, who, "serve", host.name, str(PORT), str(certs.server_cert),
                              str(certs.server_key)])  # fmt: skip
        proc.wait_for(r"listening on \S+ \(TLS\)", 30)
    # The native resolver reads the hosts file as a pod's resolver reads CoreDNS's answer: every A record. (gRPC's
    # default c-ares resolver takes only the first line of a hosts file; from a DNS server it takes them all.)
    argv = [sys.executable, who, "ask", f"who:{PORT}", "2", str(CALLS), str(certs.ca)]
    asked = lab.run(client, argv, env={"GRPC_DNS_RESOLVER": "native"})
    answered = json.loads(asked.wait_for(r"^\{.*\}$", 60).group(0))
    assert sum(answered.values()) == CALLS
    # Round robin: the replicas answer in turns (pick_first would send all 40 to one).
    assert answered == {"who1": CALLS // 2, "who2": CALLS // 2}, answered
