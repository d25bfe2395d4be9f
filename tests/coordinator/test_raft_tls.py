"""Mutual TLS on the Raft port: only a node certificate of this federation's CA speaks Raft.

The handshake and the peer checks first in memory (`TlsLink`, no sockets), then against a
real 3-node cluster: raw TLS and plain clients, and impostor pysyncobj replicas that know
the Raft password but hold the wrong certificate, beside one that holds the right one."""

from __future__ import annotations

import pickle
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cluster import pki
from coordinator.cluster.raft_tls import RaftTls, TlsLink, TlsRefused, node_problem
from coordinator.cluster.replica import Replica


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.Identity]:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    pki.init_ca(root / "other-ca")
    return {
        "n1": pki.issue(root / "ca", root / "ids", "node", "n1"),
        "n2": pki.issue(root / "ca", root / "ids", "node", "n2"),
        "site": pki.issue(root / "ca", root / "ids", "client", "site-1"),
        "foreign": pki.issue(root / "other-ca", root / "foreign", "node", "n2"),
    }


def _tls(identity: pki.Identity, node_at: Callable[[str], str | None] = lambda _: None
         ) -> RaftTls:
    return RaftTls.from_identity(identity, node_at)


def _handshake(client: TlsLink, server: TlsLink) -> tuple[bytes, bytes]:
    """Pump bytes both ways until quiet: (plaintext the client got, the server got)."""
    to_server, got_client, got_server = client.start(), b"", b""
    for _ in range(8):
        plain, to_client = server.receive(to_server)
        got_server += plain
        plain, to_server = client.receive(to_client)
        got_client += plain
        if not to_server and not to_client:
            break
    return got_client, got_server


def test_two_nodes_talk_and_what_was_sent_early_arrives(cas: dict[str, pki.Identity]) -> None:
    client = _tls(cas["n1"]).link(server_side=False, dialed="10.0.0.2:7000")
    server = _tls(cas["n2"]).link(server_side=True)
    early = client.send(b"frame sent while the handshake runs")
    assert early == b""  # queued, never sent in the clear
    got_client, got_server = _handshake(client, server)
    assert got_server == b"frame sent while the handshake runs"
    assert (client.peer, server.peer) == ("n2", "n1")
    plain, _ = client.receive(server.send(b"x" * 200_000))
    while len(plain) < 200_000:  # TLS records of 16 KiB: drain what the BIO holds
        more, _ = client.receive(b"")
        assert more, "stalled"
        plain += more
    assert plain == b"x" * 200_000


@pytest.mark.parametrize("who, why", [("site", "role 'client'"),
                                       ("foreign", "handshake failed")])
def test_a_non_node_or_another_cas_node_is_refused(cas: dict[str, pki.Identity], who: str,
                                                   why: str) -> None:
    client = _tls(cas[who]).link(server_side=False)
    server = _tls(cas["n1"]).link(server_side=True)
    with pytest.raises(TlsRefused, match=why):
        got_client, got_server = _handshake(client, server)
        assert got_server == b""
    assert not server.ready and server.peer == ""


def test_a_node_dialled_at_another_members_address_is_refused(cas: dict[str, pki.Identity]
                                                              ) -> None:
    # n1 dials 10.0.0.3:7000, which its membership says is n3: n2 answering is refused
    client = _tls(cas["n1"], {"10.0.0.3:7000": "n3"}.get).link(False, dialed="10.0.0.3:7000")
    server = _tls(cas["n2"]).link(server_side=True)
    with pytest.raises(TlsRefused, match="names node 'n2', but that address is node 'n3'"):
        _handshake(client, server)


def test_node_problem_reads_the_subject() -> None:
    cert = {"subject": ((("commonName", "n1"),), (("organizationalUnitName", "node"),))}
    assert node_problem(cert, None) is None and node_problem(cert, "n1") is None
    assert "role 'operator'" in str(node_problem(
        {"subject": ((("commonName", "op"),), (("organizationalUnitName", "operator"),))}, None))
    assert "role 'none'" in str(node_problem({"subject": ((("commonName", "x"),),)}, None))


# ---------------------------------------------------------------- a real cluster

def _frame(message: object) -> bytes:
    data = zlib.compress(pickle.dumps(message), 3)
    return struct.pack("i", len(data)) + data


def _answer(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """What the node sent back before closing (b'' when nothing), within `timeout`."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, ssl.SSLError, TimeoutError, OSError):
        pass
    return got


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_only_a_federation_node_certificate_speaks_raft(make_cluster, tmp_path: Path) -> None:
    c = make_cluster(genesis=False)
    leader = c.wait_leader(30)
    raft = {n.id: n.raft for n in c.nodes}
    host, port = raft[leader].rsplit(":", 1)
    term = c.status(leader)["raft"]["term"]
    site = pki.issue(c.ca_dir, tmp_path / "ids", "client", "site-x")
    pki.init_ca(tmp_path / "other-ca")
    victim = next(n.id for n in c.nodes if n.id != leader)  # a follower: its seat is taken
    foreign = pki.issue(tmp_path / "other-ca", tmp_path / "foreign", "node", victim)
    intruder = pki.issue(c.ca_dir, tmp_path / "ids", "node", "n9")  # a node, not the victim

    # a site's certificate completes TLS 1.3 (the client side finishes first) but its
    # frames are never read: the node closes the link without a byte of Raft
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(str(site.cert), str(site.key))
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw) as sock:
        sock.sendall(_frame(["status"]) + _frame(b"k" * 32))
        assert _answer(sock) == b""
    # a plain stranger, even one announcing 2^31 bytes, gets nothing either
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack("i", 2**31 - 1) + b"\0" * 4096)
        assert _answer(sock) == b""

    # impostors with the Raft password at the victim's address (it is stopped): none is
    # let in
    c.kill_node(victim)
    members = [raft[n] for n in raft if n != victim]

    def impostor(identity: pki.Identity, name: str) -> Replica:
        return Replica(raft[victim], members, tmp_path / name, c.password, (0.6, 1.2),
                       on_applied=lambda *_: None, tls=_tls(identity))

    for name, identity in (("site", site), ("foreign", foreign), ("n9", intruder)):
        rep = impostor(identity, name)
        try:
            assert not _wait(lambda rep=rep: rep.leader() is not None, 6.0), name
        finally:
            rep.destroy()
    assert c.wait_leader(10) == leader and c.status(leader)["raft"]["term"] == term
    logs = "".join((c.root / n / "node.log").read_text() for n in raft if n != victim)
    assert "role 'client'" in logs
    assert "handshake failed" in logs
    assert ("names node 'n9'" in logs or
            f"'n9' claimed the address of node '{victim}'" in logs)

    # the control: the victim's own certificate at its address is a member at once
    tls_dir = c.root / victim / "tls"
    own = pki.Identity(c.ca_dir / "ca.pem", tls_dir / f"{victim}.pem", tls_dir / f"{victim}.key")
    rep = impostor(own, "own")
    try:
        assert _wait(lambda: rep.leader() == raft[leader], 15.0)
    finally:
        rep.destroy()
