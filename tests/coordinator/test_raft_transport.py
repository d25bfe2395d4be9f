"""The Raft port against a stranger: a huge frame, a flood, idle connections, other
interfaces. Real replicas (pysyncobj, password set) on 127.0.0.1, raw sockets as the
attacker."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from coordinator.cluster.raft_transport import MAX_FRAME, frame_problem
from coordinator.cluster.replica import Replica
from coordinator.core import commands
from coordinator.demo.cluster import free_ports


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_frames_are_bounded_before_they_are_buffered() -> None:
    assert frame_problem(b"\x01\x00") is None  # not even a length yet
    assert frame_problem(struct.pack("i", 1024) + b"x") is None
    assert frame_problem(struct.pack("i", MAX_FRAME + 1)) is not None
    assert frame_problem(struct.pack("i", 2**31 - 1)) is not None
    assert frame_problem(struct.pack("i", -5)) is not None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    root = tmp_path_factory.mktemp("raft")
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    replicas = [Replica(a, [b for b in addrs if b != a], root / f"n{i}", "x" * 24, (0.5, 1.0),
                        on_applied=lambda *_: None) for i, a in enumerate(addrs)]
    _wait(lambda: any(r.is_leader() for r in replicas))
    yield replicas
    for r in replicas:
        r.destroy()


def _leader(replicas: list[Replica]) -> Replica:
    _wait(lambda: any(r.is_leader() for r in replicas))
    return next(r for r in replicas if r.is_leader())


def _port(replica: Replica) -> int:
    return int(replica.self_addr.rsplit(":", 1)[1])


def _closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closed `sock` within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_huge_frame_and_a_flood_cost_the_leader_nothing(cluster: list[Replica]) -> None:
    leader = _leader(cluster)
    term = leader.term()
    stop = threading.Event()
    sent = [0]

    def flood() -> None:  # announce 2^31-1 bytes, then stream garbage as fast as possible
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", _port(leader)), timeout=2) as s:
                    s.sendall(struct.pack("i", 2**31 - 1))
                    chunk = b"\xab" * 65536
                    while not stop.is_set():
                        s.sendall(chunk)
                        sent[0] += len(chunk)
            except OSError:
                time.sleep(0.01)  # closed on us: dial again

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        started = time.monotonic()
        for i in range(20):
            t0 = time.monotonic()
            assert leader.submit(commands.enroll(f"flood-{i}", f"{i + 100:064x}"))["ok"]
            assert time.monotonic() - t0 < 2.0
        assert time.monotonic() - started < 20
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert leader.is_leader() and leader.term() == term  # no election while flooded
    assert sent[0] < 64 * MAX_FRAME  # the stream was cut off, over and over


def test_a_huge_frame_announcement_is_closed_at_once(cluster: list[Replica]) -> None:
    leader = _leader(cluster)
    with socket.create_connection(("127.0.0.1", _port(leader)), timeout=2) as s:
        s.sendall(struct.pack("i", 2**31 - 1) + b"x" * 100)
        assert _closed(s, 3.0)


def test_idle_and_unnamed_connections_are_closed(cluster: list[Replica]) -> None:
    leader = _leader(cluster)
    socks = [socket.create_connection(("127.0.0.1", _port(leader)), timeout=2)
             for _ in range(40)]
    try:
        t0 = time.monotonic()
        assert all(_closed(s, max(0.1, 9.0 - (time.monotonic() - t0))) for s in socks)
        assert leader.submit(commands.enroll("after-idle", "d" * 64))["ok"]
    finally:
        for s in socks:
            s.close()


def test_the_raft_port_listens_on_its_address_only(cluster: list[Replica]) -> None:
    port = _port(cluster[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=2).close()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
