"""The Raft port, hardened: what pysyncobj 0.3.17's TCP transport lets any stranger do.

Measured against the unpatched transport: one stream announcing a 2^31-1 byte frame made a
node buffer without limit, and a 20 MiB/s stream kept its tick thread reading, so the
leader lost its lease for 30 s; a connection that never spoke was never closed; running
out of file descriptors made it close its listener for good; and any connection that
knew the password could join as a read-only node or send admin ("utility") commands.
Here, before anything is decrypted or unpickled:

* `MAX_FRAME`: a frame announcing more (or a negative length) closes the connection;
  reads per poll event are bounded, so a flood cannot hold the tick thread;
* a connection that has not named itself as a member within `hello_timeout` is closed,
  silent or not (pysyncobj checked its timeout only on traffic, so a silent stranger
  stayed forever); members' links keep pysyncobj's own timeout;
* at most `max_pending` unnamed connections, `max_pending_per_host` from one address;
* read-only nodes and utility commands are refused: fedraft uses neither;
* accept failing for lack of descriptors or memory leaves the listener open.

The listener binds only the configured Raft address (`Replica` sets pysyncobj's
`bindAddress`), not every interface. Nodes authenticate each other by mutual TLS with
node certificates (`raft_tls`, a transport class); pysyncobj's shared password stays
underneath as defence in depth.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from typing import Any

from pysyncobj import SyncObj
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.tcp_server import TcpServer

log = logging.getLogger(__name__)

MAX_FRAME = 16 * 1024 * 1024
"""Largest Raft frame accepted. Commands are small maps (pysyncobj fails on 10 MB
entries anyway); model blobs never travel through Raft."""
READS_PER_EVENT = 16
"""Socket reads per poll event: a flood is read a bounded slice at a time."""
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                                     errno.ECONNABORTED, errno.EPERM, errno.EPROTO})


def frame_problem(buffer: bytes | bytearray) -> str | None:
    """Why the frame at the start of a connection's read buffer is refused, or None."""
    if len(buffer) < 4:
        return None
    (size,) = struct.unpack_from("i", buffer)
    if size < 0 or size > MAX_FRAME:
        return f"a frame of {size} bytes (at most {MAX_FRAME})"
    return None


def _bounded_read(conn: TcpConnection) -> None:
    """pysyncobj's read loop, bounded, refusing an oversized frame before buffering it."""
    for _ in range(READS_PER_EVENT):
        if not conn._TcpConnection__processRead():  # type: ignore[attr-defined]
            break
        problem = frame_problem(conn._TcpConnection__readBuffer)  # type: ignore[attr-defined]
        if problem is not None:
            log.warning("closed a Raft connection that announced %s", problem,
                        extra={"event": "raft_frame_refused"})
            conn.disconnect()
            return
    conn._TcpConnection__lastReadTime = time.monotonic()  # type: ignore[attr-defined]


def _accept(server: TcpServer, descr: Any, event: int) -> None:
    """Accept one connection; a transient failure (no descriptors) keeps the listener."""
    from pysyncobj.poller import POLL_EVENT_TYPE

    if event & POLL_EVENT_TYPE.ERROR:
        server.unbind()  # the listening socket itself failed: pysyncobj binds it again
        return
    if not event & POLL_EVENT_TYPE.READ:
        return
    listener = server._TcpServer__socket  # type: ignore[attr-defined]
    try:
        sock, _ = listener.accept()
    except OSError as exc:
        if exc.errno in TRANSIENT_ACCEPT_ERRORS:
            log.warning("Raft listener could not accept a connection: %s", exc.strerror,
                        extra={"event": "raft_accept_failed"})
        elif exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            server.unbind()
        return
    send, recv = (server._TcpServer__sendBufferSize,  # type: ignore[attr-defined]
                  server._TcpServer__recvBufferSize)  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    conn = TcpConnection(poller=server._TcpServer__poller, socket=sock,  # type: ignore[attr-defined]
                         timeout=server._TcpServer__connectionTimeout,  # type: ignore[attr-defined]
                         sendBufferSize=send, recvBufferSize=recv,
                         keepalive=server._TcpServer__keepalive)  # type: ignore[attr-defined]
    server._TcpServer__onNewConnectionCallback(conn)  # type: ignore[attr-defined]


_patched = False


def _patch_classes() -> None:
    """The class-level part (every SyncObj in the process): bounded reads, resilient accept."""
    global _patched
    if _patched:
        return
    for cls, name in ((TcpConnection, "_TcpConnection__tryReadBuffer"),
                      (TcpServer, "_TcpServer__onNewConnection")):
        if not hasattr(cls, name):
            raise RuntimeError(f"pysyncobj internals moved: no {cls.__name__}.{name}")
    TcpConnection._TcpConnection__tryReadBuffer = _bounded_read  # type: ignore[attr-defined]
    TcpServer._TcpServer__onNewConnection = _accept  # type: ignore[attr-defined]
    _patched = True


def _peer_host(conn: TcpConnection) -> str:
    try:
        return str(conn._TcpConnection__socket.getpeername()[0])  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return "?"


def harden_transport(sync: SyncObj, *, hello_timeout: float = 5.0, max_pending: int = 64,
                     max_pending_per_host: int = 8) -> None:
    """Install the limits above on `sync`'s transport. Reaches into pysyncobj 0.3.17's
    TCP transport (its unnamed connections, callbacks and tick); raises if they moved."""
    _patch_classes()
    transport = sync._SyncObj__transport  # type: ignore[attr-defined]
    pending: set[TcpConnection] = transport._unknownConnections
    if not isinstance(pending, set):
        raise RuntimeError("pysyncobj internals moved: no set of unnamed connections")
    on_new, on_first = transport._onNewIncomingConnection, transport._onIncomingMessageReceived
    opened: dict[TcpConnection, tuple[float, str]] = {}

    def new_connection(conn: TcpConnection) -> None:  # tick thread
        host = _peer_host(conn)
        same_host = sum(1 for c in pending if opened.get(c, (0.0, ""))[1] == host)
        if len(pending) >= max_pending or same_host >= max_pending_per_host:
            log.warning("refused a Raft connection from %s: %d connections wait to name "
                        "themselves (%d from there)", host, len(pending), same_host,
                        extra={"event": "raft_connection_refused"})
            conn.disconnect()
            return
        opened[conn] = (time.monotonic(), host)
        on_new(conn)

    def first_message(conn: TcpConnection, message: Any) -> None:  # tick thread
        if message == "readonly" or isinstance(message, list):
            log.warning("closed a Raft connection from %s: %s", opened.get(conn, (0, "?"))[1],
                        "read-only nodes are not used" if message == "readonly"
                        else "utility commands are not used",
                        extra={"event": "raft_connection_refused"})
            conn.disconnect()
            pending.discard(conn)
            return
        on_first(conn, message)

    def sweep() -> None:  # tick thread: close what stayed unnamed (silent or not)
        now = time.monotonic()
        for conn, (since, host) in list(opened.items()):
            if conn not in pending:
                del opened[conn]
            elif now - since > hello_timeout:
                log.warning("closed a Raft connection from %s: it did not name itself as a "
                            "member within %.0f s", host, hello_timeout,
                            extra={"event": "raft_connection_refused"})
                conn.disconnect()
                pending.discard(conn)
                del opened[conn]

    transport._onNewIncomingConnection = new_connection
    server = transport._server
    if server is not None:  # built already, holding the unpatched callback
        server._TcpServer__onNewConnectionCallback = new_connection
    transport._onIncomingMessageReceived = first_message
    sync.addOnTickCallback(sweep)
