"""gRPC over mutual TLS with msgpack bodies: the transport shared by every API.

We use gRPC (HTTP/2) for its mature mTLS, deadlines, flow control and multiplexing,
but register generic handlers with msgpack (de)serialisers instead of protobuf code
generation: the schema lives in one Python package (`coordinator.wire`) that the site
agent can import without generated code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator import wire
from coordinator.cluster import pki, throttle
from coordinator.cluster.config import NodeAddress

log = logging.getLogger(__name__)


def channel(address: str, identity: pki.Identity) -> wire.Channel:
    """A client channel authenticated with one party's TLS material."""
    return wire.Channel(address, *identity.read())


class PeerChannels:
    """This node's channels to its peers' admin endpoints, one per peer, made on first use."""

    def __init__(self, identity: pki.Identity) -> None:
        self.identity = identity
        self._channels: dict[str, wire.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: NodeAddress) -> wire.Channel:
        with self._lock:
            ch = self._channels.get(address.id)
            if ch is None or ch.address != address.admin:
                ch = self._channels[address.id] = channel(address.admin, self.identity)
            return ch


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


Handler = Callable[[dict[str, Any], Caller], dict[str, Any]]
RpcObserver = Callable[[str, str, str, int, int], None]
"""Told of every handled call: (service, method, result code, request bytes, reply bytes)."""


_call_deadline: ContextVar[float | None] = ContextVar("fedraft_call_deadline", default=None)


def time_left(default: float) -> float:
    """Seconds a handler may still spend: `default`, cut to what its caller waits for.

    Work past the caller's deadline has no one to answer to, and a write retried after
    it could land long after the caller gave up (see `Replica.submit`)."""
    deadline = _call_deadline.get()
    if deadline is None:
        return default
    return max(0.0, min(default, deadline - time.monotonic()))


def _caller(context: grpc.ServicerContext) -> Caller:
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        return Caller("", "")
    name, role = pki.subject_of(pems[0])
    return Caller(name, role)


def _wrap(handler: Handler, roles: frozenset[str], service: str = "", method: str = "",
          observe: RpcObserver | None = None,
          limiter: throttle.RateLimiter | None = None) -> Callable[[bytes, Any], bytes]:
    def reply_to(request: bytes, context: grpc.ServicerContext) -> dict[str, Any]:
        caller = _caller(context)
        if caller.role not in roles:
            return wire.error("forbidden", f"role {caller.role or 'none'!r} may not call this method")
        refused = throttle.admit(limiter, caller.name, service, method, len(request))
        if refused is not None:  # before unpacking: a refused call costs nothing, changes nothing
            return refused
        remaining = context.time_remaining()
        token = _call_deadline.set(None if remaining is None else time.monotonic() + remaining)
        try:
            return handler(wire.unpack(request), caller)
        except wire.CodedError as exc:
            return exc.reply()
        except Exception:
            log.exception("handler failed")
            return wire.error("internal", "internal error; see the node's log")
        finally:
            _call_deadline.reset(token)

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        reply = reply_to(request, context)
        try:
            body = wire.pack(reply)
        except Exception:
            log.exception("reply could not be encoded")
            reply = wire.error("internal", "internal error; see the node's log")
            body = wire.pack(reply)
        if observe is not None:
            code = "ok" if reply.get("ok") else str(reply.get("code") or "error")
            try:
                observe(service, method, code, len(request), len(body))
            except Exception:  # metrics must never fail a call
                log.debug("rpc observer failed", exc_info=True)
        return body

    return call


def make_server(
    identity: pki.Identity,
    bind: str,
    services: dict[str, dict[str, tuple[Handler, frozenset[str]]]],
    workers: int = 64,
    observe: RpcObserver | None = None,
    limiter: throttle.RateLimiter | None = None,
) -> grpc.Server:
    """A started-ready (not yet started) mTLS gRPC server hosting `services`; `observe`
    (metrics) hears of every call, `limiter` throttles each caller (see coordinator.cluster.throttle)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=throttle.SERVER_OPTIONS)
    for service, methods in services.items():
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                _wrap(fn, roles, service, name, observe, limiter))
            for name, (fn, roles) in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    ca, cert, key = identity.read()
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                        require_client_auth=True)
    if server.add_secure_port(bind, creds) == 0:
        raise OSError(f"cannot bind {bind}")
    return server
