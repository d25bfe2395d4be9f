"""The client side of a node's gRPC + mutual TLS endpoint, shared by sites, operators and peers.

gRPC (HTTP/2) gives mature mutual TLS, per-call deadlines, flow control and keep-alives;
its generic handlers carry msgpack bodies, so the schema is this package rather than
generated protobuf code.
"""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.wire.codec import pack, unpack
from coordinator.wire.schema import MAX_MESSAGE_BYTES

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + 1024),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES + 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A node that died comes back (or its successor answers) within seconds. gRPC's
    # default reconnect backoff (1 s, growing to 120 s) keeps failing calls to it at once
    # with UNAVAILABLE long after it is up: sites then skip a live leader for seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class Channel:
    """A connection to one node's API over mutual TLS: `call(service, method, message)`."""

    def __init__(self, address: str, ca: bytes, cert: bytes, key: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        self.address = address
        self._channel = grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
        self._stubs: dict[str, Any] = {}

    def call(self, service: str, method: str, message: dict[str, Any],
             timeout: float = 10.0) -> dict[str, Any]:
        """Raises grpc.RpcError for transport failures; returns the reply map otherwise."""
        path = f"/{service}/{method}"
        stub = self._stubs.get(path)
        if stub is None:
            stub = self._channel.unary_unary(path)
            self._stubs[path] = stub
        return unpack(stub(pack(message), timeout=timeout))

    def close(self) -> None:
        self._channel.close()
