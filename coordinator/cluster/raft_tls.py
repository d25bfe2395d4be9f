"""Mutual TLS on the Raft port: each node proves it is a node of this federation.

pysyncobj's TCP transport authenticates peers by one shared password, and a peer that
knows it can send pickles. Here every Raft connection is TLS 1.3 with certificates from
the federation CA, and the peer must hold a *node* certificate (role "node"); where the
Raft address it dials or claims is a known member's, the certificate's name must be that
member's id. Nothing reaches pysyncobj's frame parser (let alone pickle) before the
handshake has verified the peer. The password stays, as defence in depth.

TLS runs in memory (`ssl.MemoryBIO`): pysyncobj keeps its own non-blocking sockets and
poller, and `TlsLink` turns the bytes they carry into frames and back. `TlsLink` has no
socket, so the handshake and the peer checks are tested without a network.
"""

from __future__ import annotations

import errno
import logging
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pysyncobj.pickle as raft_pickle
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport

from coordinator.cluster.pki import Identity

log = logging.getLogger(__name__)

NODE_ROLE = "node"
NodeAt = Callable[[str], "str | None"]
"""A Raft address -> the id of the member there, or None when no member is known there."""


class TlsRefused(Exception):
    """The peer failed the handshake or is not a node; the message names why."""


def peer_name(cert: dict[str, Any]) -> tuple[str, str]:
    """(common name, organizational unit) of a verified peer certificate (`getpeercert()`)."""
    fields = {key: value for rdn in cert.get("subject", ()) for key, value in rdn}
    return str(fields.get("commonName", "")), str(fields.get("organizationalUnitName", ""))


def node_problem(cert: dict[str, Any], expected: str | None) -> str | None:
    """Why a verified certificate may not speak Raft (as the node `expected`), or None."""
    name, role = peer_name(cert)
    if role != NODE_ROLE:
        return f"its certificate {name!r} has role {role or 'none'!r}, not {NODE_ROLE!r}"
    if expected is not None and name != expected:
        return f"its certificate names node {name!r}, but that address is node {expected!r}"
    return None


@dataclass(frozen=True)
class RaftTls:
    """This node's TLS material for the Raft port, and who is expected where."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    node_at: NodeAt

    @classmethod
    def from_identity(cls, identity: Identity, node_at: NodeAt) -> RaftTls:
        """Contexts that present `identity` and trust only its CA, TLS 1.3 only."""
        def context(purpose: int) -> ssl.SSLContext:
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False  # the peer is checked by node id, not host name
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(identity.ca))
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
            return ctx

        return cls(context(ssl.PROTOCOL_TLS_SERVER), context(ssl.PROTOCOL_TLS_CLIENT), node_at)

    def link(self, server_side: bool, dialed: str | None = None) -> TlsLink:
        """A fresh link; `dialed` is the Raft address an outgoing connection went to."""
        ctx = self.server if server_side else self.client
        return TlsLink(ctx, server_side, self.node_at(dialed) if dialed else None)


class TlsLink:
    """One connection's TLS state: ciphertext in, frames out, and the reverse."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, expected: str | None) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._expected = expected
        self._queued = bytearray()  # plaintext written before the handshake finished
        self.ready = False
        self.peer = ""  # the node id its certificate names, once verified

    def start(self) -> bytes:
        """The first flight (a client's hello; nothing for a server)."""
        return self.receive(b"")[1]

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed ciphertext from the socket: (plaintext for pysyncobj, ciphertext to send)."""
        if data:
            self._in.write(data)
        if not self.ready and not self._handshake():
            return b"", self._out.read()
        chunks = []
        while True:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError as exc:
                raise TlsRefused("the peer closed TLS") from exc
            except ssl.SSLError as exc:
                raise TlsRefused(f"TLS failed: {exc.reason or exc}") from exc
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), self._out.read()

    def send(self, plaintext: bytes) -> bytes:
        """Ciphertext to send for `plaintext` (queued until the handshake is done)."""
        if not self.ready:
            self._queued += plaintext
            return b""
        self._tls.write(plaintext)
        return self._out.read()

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TlsRefused(f"TLS handshake failed: {exc.reason or exc}") from exc
        cert = self._tls.getpeercert()
        problem = node_problem(cert or {}, self._expected)
        if problem is not None:
            raise TlsRefused(problem)
        self.peer = peer_name(cert or {})[0]
        self.ready = True
        if self._queued:
            self._tls.write(bytes(self._queued))
            self._queued.clear()
        return True


# ---------------------------------------------------------------- pysyncobj's side

def _queue(conn: TcpConnection, ciphertext: bytes, *, flush: bool = True) -> None:
    """Append to the socket's write buffer; make sure the poller will drain it."""
    if not ciphertext:
        return
    conn._TcpConnection__writeBuffer += ciphertext  # type: ignore[attr-defined]
    if not flush or conn.state == CONNECTION_STATE.CONNECTING:
        return  # a connecting socket is sent to once it is writable
    conn._TcpConnection__trySendBuffer()  # type: ignore[attr-defined]
    fileno = conn.fileno()
    if fileno is not None and conn.state != CONNECTION_STATE.DISCONNECTED \
            and conn._TcpConnection__writeBuffer:  # type: ignore[attr-defined]
        conn._TcpConnection__poller.subscribe(  # type: ignore[attr-defined]
            fileno, conn._TcpConnection__processConnection,  # type: ignore[attr-defined]
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR)


def _refuse(conn: TcpConnection, link: TlsLink, why: str) -> None:
    log.warning("closed a Raft connection from %s: %s", _peer(conn) or link.peer or "?", why,
                extra={"event": "raft_tls_refused"})
    conn.disconnect()


def _peer(conn: TcpConnection) -> str:
    try:
        host, port = conn._TcpConnection__socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return ""
    return f"{host}:{port}"


def read_once(conn: TcpConnection) -> bool:
    """One socket read through the connection's TLS link; False when nothing more."""
    link: TlsLink = conn.tls  # type: ignore[attr-defined]
    sock = conn._TcpConnection__socket  # type: ignore[attr-defined]
    try:
        data = sock.recv(conn._TcpConnection__recvBufferSize)  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            conn.disconnect()
        return False
    if not data:
        conn.disconnect()
        return False
    try:
        plaintext, ciphertext = link.receive(data)
    except TlsRefused as exc:
        _refuse(conn, link, str(exc))
        return False
    conn._TcpConnection__readBuffer += plaintext  # type: ignore[attr-defined]
    _queue(conn, ciphertext)
    return conn.state != CONNECTION_STATE.DISCONNECTED


def _send(conn: TcpConnection, message: Any) -> None:
    """pysyncobj's `TcpConnection.send` (same frame), through the TLS link."""
    if conn.sendRandKey:
        message = (conn.sendRandKey, message)
    data = zlib.compress(raft_pickle.dumps(message), 3)
    if conn.encryptor:
        data = conn.encryptor.encrypt_at_time(data, int(time.monotonic()))
    _queue(conn, conn.tls.send(struct.pack("i", len(data)) + data))  # type: ignore[attr-defined]


def _attach(conn: TcpConnection, link: TlsLink) -> None:
    """Route this connection's reads and sends through `link`, on the instance: from its
    first byte, before any other patch could be missing."""
    conn.tls = link  # type: ignore[attr-defined]
    conn.send = lambda message: _send(conn, message)  # type: ignore[method-assign]
    conn._TcpConnection__processRead = lambda: read_once(conn)  # type: ignore[attr-defined]


def tls_transport(tls: RaftTls) -> type[TCPTransport]:
    """A pysyncobj transport class whose every connection is mutual TLS (see the module)."""

    class TlsTransport(TCPTransport):  # type: ignore[misc]
        def addNode(self, node: Any) -> None:  # noqa: N802 (pysyncobj's name)
            super().addNode(node)
            conn = self._connections.get(node)
            if conn is not None and not hasattr(conn, "tls"):
                plain_connect = conn.connect

                def connect(host: str, port: int, conn: TcpConnection = conn) -> bool:
                    if not plain_connect(host, port):
                        return False
                    link = tls.link(server_side=False, dialed=node.address)
                    _attach(conn, link)
                    _queue(conn, link.start(), flush=False)
                    return True

                conn.connect = connect
                conn.tls = None

        def _onNewIncomingConnection(self, conn: TcpConnection) -> None:  # noqa: N802
            _attach(conn, tls.link(server_side=True))
            super()._onNewIncomingConnection(conn)

        def _onIncomingMessageReceived(self, conn: TcpConnection, message: Any) -> None:  # noqa: N802
            link = getattr(conn, "tls", None)
            if link is not None and isinstance(message, str) and message in self._nodeAddrToNode:
                expected = tls.node_at(message)
                if expected is not None and expected != link.peer:
                    _refuse(conn, link, f"node {link.peer!r} claimed the address of node "
                                        f"{expected!r} ({message})")
                    self._unknownConnections.discard(conn)
                    return
            super()._onIncomingMessageReceived(conn, message)

    return TlsTransport
