"""Client channels: round robin over every address a name resolves to, and TLS when a CA is given."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plumbing import errors
from plumbing.settings import setting

if TYPE_CHECKING:
    import grpc

# Every call picks the next ready subchannel: a headless Service's name (one A record per pod) spreads calls over
# its pods, where gRPC's default (pick_first) would send every call of the channel to one pod.
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")
PICK_FIRST = ("grpc.lb_policy_name", "pick_first")


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the servers it calls (and, for mutual TLS, proves who it is)."""

    ca_file: Path | None = setting(None, "PEM CA bundle the servers' certificates chain to: TLS on", flag="tls-ca")
    cert_file: Path | None = setting(
        None, "PEM client certificate, for servers that ask (mutual TLS)", flag="tls-client-cert"
    )
    key_file: Path | None = setting(None, "PEM private key of --tls-client-cert", flag="tls-client-key")
    server_name: str = setting(
        "", "name the servers' certificates must carry, if not the target's host", flag="tls-server-name"
    )

    @property
    def enabled(self) -> bool:
        """TLS is asked for: a CA, or a client certificate or key (which without a CA is refused, not ignored)."""
        return any(f is not None for f in (self.ca_file, self.cert_file, self.key_file))

    def for_name(self, host: str) -> ClientTLS:
        """These settings for an address that `host` resolved to (a pod's IP from a headless Service's name):
        the certificate must then carry `host`, which the IP dialled does not say (unless a name is set)."""
        return self if self.server_name or not host else dataclasses.replace(self, server_name=host)


def target(address: str) -> str:
    """`host:port` as a DNS target (every A record is a backend); targets with a scheme stay as they are."""
    return address if "://" in address or address.startswith(("unix:", "ipv4:", "ipv6:")) else f"dns:///{address}"


def channel_credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    """The credentials of `tls`'s files, read now: a missing or unreadable file fails here, with its name."""
    import grpc  # here, not at import: a command's --help (its config names ClientTLS) loads no gRPC

    if (tls.cert_file is None) != (tls.key_file is None):
        raise errors.InvalidArgument("mutual TLS needs both --tls-client-cert and --tls-client-key")
    if tls.ca_file is None and tls.cert_file is not None:
        raise errors.InvalidArgument("--tls-client-cert needs --tls-ca (the CA the servers' certificates chain to)")
    try:
        ca = tls.ca_file.read_bytes() if tls.ca_file is not None else None
        key = tls.key_file.read_bytes() if tls.key_file is not None else None
        cert = tls.cert_file.read_bytes() if tls.cert_file is not None else None
    except OSError as exc:
        raise errors.FailedPrecondition(f"TLS file {exc.filename}: {exc.strerror}") from None
    for name, pem in (("--tls-ca", ca), ("--tls-client-cert", cert), ("--tls-client-key", key)):
        if pem is not None and b"-----BEGIN " not in pem:
            raise errors.InvalidArgument(f"{name}: not a PEM file (no -----BEGIN line)")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(
    address: str,
    tls: ClientTLS | None = None,
    options: Sequence[tuple[str, Any]] = (),
    *,
    spread: bool = True,
) -> grpc.Channel:
    """A channel to every backend `address` names, calls spread round robin; TLS when `tls` has a CA.

    `options` (message limits, back-off) come first; the load-balancing config is added last. gRPC resolves the
    name again when a backend goes away, so pods that a Service gains are picked up on the next re-resolution.
    `spread=False` keeps every call on one backend (gRPC's pick_first): for clients whose calls share state on
    the server, such as a game session."""
    import grpc

    opts: list[tuple[str, Any]] = [*options, ROUND_ROBIN if spread else PICK_FIRST]
    if tls is not None and tls.enabled:
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.secure_channel(target(address), channel_credentials(tls), options=opts)
    return grpc.insecure_channel(target(address), options=opts)
