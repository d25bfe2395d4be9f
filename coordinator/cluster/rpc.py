"""gRPC over mutual TLS with msgpack bodies: the transport shared by every API.

We use gRPC (HTTP/2) for its mature mTLS, deadlines, flow control and multiplexing,
but register generic handlers with msgpack (de)serialisers instead of protobuf code
generation: the schema lives in one Python package (`coordinator.wire`) that the site
agent can import without generated code.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
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


def _gate(context: grpc.ServicerContext, request: bytes, roles: frozenset[str], service: str,
          method: str, limiter: throttle.RateLimiter | None) -> tuple[Caller, dict[str, Any] | None]:
    """Who calls, and the refusal if their role may not call this or they are over their
    rate or size: checked before the request is unpacked, so a refusal costs nothing."""
    caller = _caller(context)
    if caller.role not in roles:
        return caller, wire.error("forbidden",
                                  f"role {caller.role or 'none'!r} may not call this method")
    return caller, throttle.admit(limiter, caller.name, service, method, len(request))


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _encode(reply: dict[str, Any], request: bytes, service: str, method: str,
            observe: RpcObserver | None) -> bytes:
    """The reply's bytes (an unencodable reply becomes `internal`); `observe` hears of it."""
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


def _handle(handler: Handler, request: bytes, caller: Caller, deadline: float | None) -> dict[str, Any]:
    """Run a handler on the unpacked request, with the caller's deadline in reach."""
    token = _call_deadline.set(deadline)
    try:
        return handler(wire.unpack(request), caller)
    except Exception as exc:
        return _failed(exc)
    finally:
        _call_deadline.reset(token)


def _failed(exc: Exception) -> dict[str, Any]:
    """A handler's exception as its reply: a coded refusal as it is, anything else as
    `internal` (logged with its trace here, never sent to the caller)."""
    if isinstance(exc, wire.CodedError):
        return exc.reply()
    log.error("handler failed", exc_info=exc)
    return wire.error("internal", "internal error; see the node's log")


def _wrap(handler: Handler, roles: frozenset[str], service: str = "", method: str = "",
          observe: RpcObserver | None = None,
          limiter: throttle.RateLimiter | None = None) -> Callable[[bytes, Any], bytes]:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        caller, refused = _gate(context, request, roles, service, method, limiter)
        reply = refused or _handle(handler, request, caller, _deadline(context))
        return _encode(reply, request, service, method, observe)

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


AsyncHandler = Callable[[dict[str, Any], Caller], Awaitable[dict[str, Any]]]


async def _handle_async(handler: AsyncHandler, request: bytes, caller: Caller,
                        deadline: float | None) -> dict[str, Any]:
    token = _call_deadline.set(deadline)
    try:
        return await handler(wire.unpack(request), caller)
    except Exception as exc:
        return _failed(exc)
    finally:
        _call_deadline.reset(token)


def _wrap_async(handler: Handler, waiting: AsyncHandler | None, roles: frozenset[str],
                service: str, method: str, observe: RpcObserver | None,
                limiter: throttle.RateLimiter | None) -> Callable[[bytes, Any], Awaitable[bytes]]:
    """The coroutine gRPC's asyncio server calls: `waiting` (a handler that waits without
    a thread) runs on the event loop, any other handler and its reply's encoding on the
    server's thread pool, so the loop only routes."""
    async def call(request: bytes, context: Any) -> bytes:
        caller, refused = _gate(context, request, roles, service, method, limiter)
        if refused is not None:
            return _encode(refused, request, service, method, observe)
        deadline = _deadline(context)
        if waiting is not None:
            reply = await _handle_async(waiting, request, caller, deadline)
            return _encode(reply, request, service, method, observe)
        return await asyncio.to_thread(
            lambda: _encode(_handle(handler, request, caller, deadline), request, service,
                            method, observe))

    return call


class AsyncServer:
    """One mTLS gRPC service on gRPC's asyncio server, with its own thread and event loop.

    The fleet API's long polls wait here as suspended coroutines: under the thread-pool
    server each waiting poll held one of `workers` threads, so with more idle sites than
    workers a stage's tasks queued behind polls that had nothing to say. `workers` now
    bounds only the handlers that compute (Submit, GetBlob). Same gate, deadlines,
    errors and metrics as `make_server`.
    """

    def __init__(self, identity: pki.Identity, bind: str, service: str,
                 methods: dict[str, tuple[Handler, frozenset[str]]],
                 waiting: dict[str, AsyncHandler], workers: int = 64,
                 observe: RpcObserver | None = None,
                 limiter: throttle.RateLimiter | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix=f"{service}-worker")
        self._loop.set_default_executor(self._pool)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{service}-loop",
                                        daemon=True)
        self._thread.start()
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            _wrap_async(fn, waiting.get(name), roles, service, name, observe, limiter))
            for name, (fn, roles) in methods.items()}
        ca, cert, key = identity.read()
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                            require_client_auth=True)

        async def build() -> grpc.aio.Server:
            server = grpc.aio.server(options=throttle.SERVER_OPTIONS)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            if server.add_secure_port(bind, creds) == 0:
                raise OSError(f"cannot bind {bind}")
            return server

        try:
            self._server = self._run(build())
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> None:
        self._run(self._server.start())

    def stop(self, grace: float | None) -> None:
        try:
            self._run(self._server.stop(grace))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)
