"""Serving the console over mutual TLS, admitting the auditor role only.

Two layers. The TLS handshake (Python's ``ssl``, ``CERT_REQUIRED`` against the federation
CA) refuses a client with no certificate or one the CA did not sign. uvicorn does not pass
the peer certificate to the application, so ``TLSScopeH11Protocol`` (uvicorn's own h11
protocol, subclassed) reads it from the connection's ``ssl_object`` once the handshake is
done and puts it into every request's scope as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``). ``RequireRole`` then answers 403 to
any certificate whose role (the subject's OU, as ``coordinator.cluster.pki`` issues it) is not
``auditor``; it fails closed, so the app served without that protocol admits nobody.
"""

from __future__ import annotations

import asyncio
import html
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.x509.oid import NameOID
from starlette.responses import HTMLResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

AUDITOR = "auditor"
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@lru_cache(maxsize=256)
def subject_of(cert_pem: bytes) -> tuple[str, str]:
    """(common name, role) of a PEM certificate, role being the subject's OU.

    The federation's convention (``coordinator.cluster.pki``, which the audit layer may not
    import); the TLS layer has already checked the CA's signature on it.
    """
    subject = x509.load_pem_x509_certificate(cert_pem).subject
    cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None when it is not TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {"server_cert": None, "client_cert_chain": chain, "client_cert_name": None,
            "client_cert_error": None if chain else "no client certificate",
            "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""), "cipher_suite": None}


class TLSScopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that also hands the peer certificate to the application."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is None:
            return
        inner: ASGIApp = self.app

        async def with_tls(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})["tls"] = dict(tls)
            await inner(scope, receive, send)

        self.app = with_tls  # per connection: this protocol object serves one connection


class RequireRole:
    """ASGI middleware: 403 unless the client certificate's role is ``role``."""

    def __init__(self, app: ASGIApp, role: str = AUDITOR) -> None:
        self.app = app
        self.role = role

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        tls = (scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        if not chain:
            await self._deny(scope, receive, send, "no client certificate reached the console")
            return
        name, role = subject_of(chain[0].encode("ascii"))
        if role != self.role:
            await self._deny(scope, receive, send,
                             f"the certificate of {name or '?'} has role {role or '(none)'}; "
                             f"this console admits the {self.role} role only")
            return
        scope.setdefault("state", {})["peer"] = {"name": name, "role": role}
        await self.app(scope, receive, send)

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, why: str) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>refused"
                "</title></head><body><h1 id='refused'>403: auditors only</h1><p>"
                f"{html.escape(why)}</p></body></html>")
        await HTMLResponse(body, status_code=403)(scope, receive, send)


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context that requires a client certificate signed by ``ca``.

    Raises OSError or ssl.SSLError for unreadable or mismatched files.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(cert), str(key))
    return context


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port); OSError when that cannot be had.

    Bound here rather than by uvicorn so a taken port is a one-line usage error, not a log.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the caller its URL once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_ready is not None and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self._on_ready(f"https://{shown}:{port}/")


def serve(
    app: ASGIApp,
    context: ssl.SSLContext,
    sock: socket.socket,
    *,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Run ``app`` under uvicorn over mutual TLS on ``sock`` until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        app, http=TLSScopeH11Protocol, ws="none", lifespan="off",
        ssl_context_factory=lambda _config, _default: context, log_level=log_level,
        proxy_headers=False, server_header=False, access_log=log_level in ("info", "debug"),
    )
    _Server(config, on_ready).run(sockets=[sock])
