"""One client over several servers (replicas of one store), with gRPC's own machinery.

The addresses become one static gRPC target; gRPC's ``round_robin`` policy spreads calls over the
replicas whose connection is up; a call that fails UNAVAILABLE (a replica gone, or its queue full)
is retried by gRPC's retry policy, and round robin sends the retry to the next replica. gRPC's
client-side health checking is not asked for: it needs the health service's ``Watch``, and Triton
(2.51) answers only ``Check`` (``Watch`` is UNIMPLEMENTED: gRPC then logs an error line to stderr
and treats the replica as healthy anyway). Every inference call
is safe to send twice: searches and recommendations only read, and events and catalogue updates
carry ids that make a retry count once.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

RETRY_ATTEMPTS = 3  # per call, on the replicas in turn

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "inference.GRPCInferenceService"}],
            "retryPolicy": {
                "maxAttempts": RETRY_ATTEMPTS,
                "initialBackoff": "0.02s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def split_addresses(url: str | Sequence[str]) -> list[str]:
    """``url`` as a list of addresses: a sequence, or a string with commas between them."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    addresses = [part.strip() for part in parts if part.strip()]
    if not addresses:
        raise ValueError("no server address given")
    return addresses


def checked_addresses(url: str | Sequence[str]) -> list[str]:
    """``url``'s addresses (split_addresses), each checked to be host:port (else ValueError)."""
    addresses = split_addresses(url)
    for address in addresses:
        _host_and_port(address)
    return addresses


def _host_and_port(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"server address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _resolve(address: str) -> dict[int, list[str]]:
    """``address``'s IP addresses with its port, by IP version."""
    host, port = _host_and_port(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"server address {address!r}: {exc.strerror}") from exc
    found: dict[int, list[str]] = {4: [], 6: []}
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        entry = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
        if entry not in found[ip.version]:
            found[ip.version].append(entry)
    return found


def replica_target(addresses: Sequence[str]) -> str:
    """A gRPC target naming every replica: ``ipv4:a:p,b:p`` (or ``ipv6:``, where some replica
    has no IPv4 address). Host names are resolved now, each to all its addresses."""
    resolved = [_resolve(address) for address in addresses]
    for version in (4, 6):
        if all(entries[version] for entries in resolved):
            unique = dict.fromkeys(e for entries in resolved for e in entries[version])
            return f"ipv{version}:" + ",".join(unique)
    raise ValueError(f"replicas {list(addresses)} share no IP version: give IPv4 or IPv6 for all")


def replica_channel_args(first_host: str, tls: bool) -> list[tuple[str, object]]:
    """tritonclient's own channel options, plus the replicas' service config. With TLS every
    replica's certificate is checked against the first address's host name."""
    keepalive = KeepAliveOptions()
    args: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    if tls:
        args.append(("grpc.ssl_target_name_override", first_host))
    return args


def channel(url: str | Sequence[str], tls: bool) -> tuple[str, dict]:
    """The target and the extra keyword arguments of tritonclient's InferenceServerClient for
    ``url``: one address as it is, several as replicas."""
    addresses = checked_addresses(url)
    if len(addresses) == 1:  # resolved by gRPC when it connects: the name may come up later
        return addresses[0], {}
    first_host, _ = _host_and_port(addresses[0])
    return replica_target(addresses), {"channel_args": replica_channel_args(first_host, tls)}
