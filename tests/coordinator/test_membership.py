"""Membership changes, one at a time: the pure `membership` record, then real processes.

The process tests share one cluster and run in file order: n4 joins a 3-node cluster,
leadership moves to n4, n2 leaves (and no longer counts toward any quorum), every
remaining node's audit log holds the same membership_changed entries, and finally the
leader itself is removed, leadership handed over first.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import wire
from coordinator.audit.writer import audit_record
from coordinator.cluster import pki
from coordinator.core.state import apply, initial_state
from coordinator.demo.cluster import LocalCluster, free_ports
from coordinator.ops.admin_client import Refused, Unreachable

from .conftest import fedraft_cli as _fedraft

# ---------------------------------------------------------------- the replicated record


def _member(i: int) -> dict[str, str]:
    return {"id": f"n{i}", "raft": f"10.0.0.{i}:7100", "fleet": f"10.0.0.{i}:7200",
            "admin": f"10.0.0.{i}:7300"}


def _record(change: str, node: int, members: list[int], request_id: str = "r1") -> dict:
    return {"op": "membership", "change": change, "node": _member(node)["raft"],
            "members": [_member(i) for i in members], "operator": "alice",
            "request_id": request_id}


def test_membership_record_sets_members_and_audits_once():
    s = initial_state()
    r = apply(s, _record("add", 4, [1, 2, 3, 4]))
    assert r["ok"] and r["node_id"] == "n4" and len(r["members"]) == 4
    assert [m["id"] for m in s["members"]] == ["n1", "n2", "n3", "n4"]
    kind, payload = audit_record(_record("add", 4, [1, 2, 3, 4]), r, s)
    assert kind == "membership_changed"
    assert payload == {"change": "add", "node": "10.0.0.4:7100", "node_id": "n4",
                       "members": [_member(i)["raft"] for i in (1, 2, 3, 4)], "operator": "alice",
                       "actor": "alice"}
    again = apply(s, _record("add", 4, [1, 2, 3, 4]))  # a retry: same result, no new entry
    assert again["replayed"] and audit_record(_record("add", 4, [1, 2, 3, 4]), again, s) is None
    removed = apply(s, _record("remove", 2, [1, 3, 4], "r2") | {"node_id": "n2"})
    assert removed["ok"] and removed["node_id"] == "n2"
    assert [m["id"] for m in s["members"]] == ["n1", "n3", "n4"]


@pytest.mark.parametrize("bad", [
    {"change": "rename"},
    {"node": "nohost"},
    {"members": []},
    {"members": [{"id": "n1", "raft": "10.0.0.1:7100"}]},
    {"members": [_member(1), _member(1) | {"id": "nX"}]},  # one Raft address twice
    {"members": [_member(1)]},  # an added node must be a member afterwards
    {"request_id": None},
    {"operator": 5},
])
def test_membership_record_rejects_bad_input_and_changes_nothing(bad):
    s = initial_state()
    assert apply(s, _record("add", 4, [1, 2, 3, 4], "first"))["ok"]
    before = [dict(m) for m in s["members"]]
    command = {k: v for k, v in (_record("add", 2, [1, 2], "r9") | bad).items() if v is not None}
    r = apply(s, command)
    assert not r["ok"] and r["code"] == "malformed"
    assert s["members"] == before


def test_removed_node_must_not_stay_a_member():
    r = apply(initial_state(), _record("remove", 2, [1, 2, 3]))
    assert not r["ok"] and "not be a member" in r["error"]


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    return make_module_cluster("membership", genesis=False)



def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _enroll(cluster: LocalCluster, site: str) -> None:
    key = wire.public_key_hex(Ed25519PrivateKey.generate())
    cluster.admin.call("Enroll", {"site": site, "public_key": key})


def _status(cluster: LocalCluster, node_id: str) -> dict:
    return cluster.admin.call("Status", endpoint=cluster.admin_of(node_id))


def _members(cluster: LocalCluster) -> list[str]:
    return _status(cluster, cluster.wait_leader(10))["raft"]["members"]


def _view(cluster: LocalCluster, node_id: str) -> dict:
    """What every replica must agree on: sites and their ledgers, the version chain."""
    ep = cluster.admin_of(node_id)
    sites = cluster.admin.all_sites(endpoint=ep)
    rounds = cluster.admin.round_status(endpoint=ep)
    return {"sites": [{k: v for k, v in s.items() if k != "online"} for s in sites],
            "versions": rounds["versions"], "leader_history": rounds["leader_history"]}


def _wait_same_view(cluster: LocalCluster, node_ids: list[str], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            views = [_view(cluster, n) for n in node_ids]
            if all(v == views[0] for v in views):
                return views[0]
        except (Refused, Unreachable):
            views = []
        assert time.monotonic() < deadline, f"nodes {node_ids} disagree"
        time.sleep(0.2)


def _wait_answering(cluster: LocalCluster, node_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _status(cluster, node_id)
        except (Refused, Unreachable):
            assert time.monotonic() < deadline, f"{node_id} does not answer"
            time.sleep(0.2)


def test_added_node_applies_commands_and_holds_the_same_state(cluster):
    for i in range(3):
        _enroll(cluster, f"before-{i}")
    n4 = cluster.new_node()
    assert [p.id for p in cluster.nodes] == ["n1", "n2", "n3", "n4"]
    cluster.start_node(n4.id)
    _wait_answering(cluster, n4.id)
    time.sleep(1.5)  # over one election timeout: a joining node must not stand for election
    alone = _status(cluster, n4.id)
    assert alone["state"]["sites"] == 0 and len(alone["raft"]["members"]) == 4  # not yet in
    assert alone["raft"]["term"] == 0 and alone["raft"]["state"] == "follower"

    r = _fedraft(cluster, "cluster", "add-node", n4.raft, "--node-admin", n4.admin, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = _last_json(r.stdout)
    assert out["node_id"] == "n4" and out["recorded"] and out["caught_up"], out
    assert sorted(out["members"]) == sorted(n.raft for n in cluster.nodes)

    for i in range(3):
        _enroll(cluster, f"after-{i}")
    view = _wait_same_view(cluster, ["n1", "n2", "n3", "n4"])
    assert {s["site"] for s in view["sites"]} == {f"{w}-{i}" for w in ("before", "after")
                                                   for i in range(3)}
    st = _status(cluster, "n4")
    assert st["self"]["raft"] == n4.raft
    assert {n["id"]: n["admin"] for n in st["nodes"]} == {n.id: n.admin for n in cluster.nodes}
    # the others learn n4's endpoints from the replicated record, not their config
    n1 = _status(cluster, "n1")
    assert {n["id"]: n["fleet"] for n in n1["nodes"]}["n4"] == n4.fleet


def test_second_change_while_one_runs_is_refused(cluster):
    """A change holds the leader's one-at-a-time lock until done; here an add waits on
    a new node that accepts TCP but never answers TLS, so the second change meets it."""
    before = _members(cluster)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    ghost_raft = f"127.0.0.1:{free_ports(1)[0]}"
    outcome: list[BaseException] = []

    def slow_add() -> None:
        try:
            cluster.admin.add_node(ghost_raft, f"127.0.0.1:{silent.getsockname()[1]}", 20)
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=slow_add)
    t.start()
    try:
        deadline = time.monotonic() + 4
        while True:  # removing a non-member changes nothing: safe to ask until it is busy
            with pytest.raises(Refused) as probe:
                cluster.admin.remove_node("127.0.0.1:1")
            if probe.value.code == "change_in_progress":
                break
            assert probe.value.code == "unknown_node"
            assert time.monotonic() < deadline, "the first change never held the lock"
            time.sleep(0.05)
        with pytest.raises(Refused) as second:
            cluster.admin.remove_node("n3")
        assert second.value.code == "change_in_progress"
        assert "one at a time" in str(second.value) and ghost_raft in str(second.value)
    finally:
        t.join(30)
        silent.close()
    assert len(outcome) == 1 and isinstance(outcome[0], Refused)
    assert outcome[0].code == "unreachable_node"
    assert _members(cluster) == before


def test_removing_an_unknown_node_is_refused_and_changes_nothing(cluster):
    before = _members(cluster)
    r = _fedraft(cluster, "cluster", "remove-node", "127.0.0.1:1", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert _last_json(r.stdout)["code"] == "unknown_node"
    assert "not a member" in r.stderr and "nothing changed" in r.stderr
    bad = _fedraft(cluster, "cluster", "add-node", "no-port-here", "--json")
    assert bad.returncode == 2 and "host:port" in bad.stdout + bad.stderr
    assert _members(cluster) == before


def test_membership_methods_are_operator_only(cluster):
    """Auditors, sites and even nodes may not change the members: operators decide."""
    before = _members(cluster)
    leader_admin = cluster.admin_of(cluster.wait_leader(10))
    for role in ("auditor", "client", "node"):
        ident = pki.issue(cluster.ca_dir, cluster.root / "certs" / role, role, f"{role}-x")
        ch = wire.Channel(leader_admin, (cluster.ca_dir / "ca.pem").read_bytes(),
                          ident.cert.read_bytes(), ident.key.read_bytes())
        try:
            for method, message in (("AddNode", {"node": "127.0.0.1:1"}),
                                    ("RemoveNode", {"node": "n3"}), ("TransferLeader", {})):
                reply = ch.call(wire.ADMIN_SERVICE, method, message, timeout=10)
                assert reply["code"] == "forbidden", (role, method, reply)
        finally:
            ch.close()
    assert _members(cluster) == before


def test_transfer_leadership_to_a_named_node(cluster):
    old = cluster.wait_leader(10)
    target = "n4" if old != "n4" else "n3"
    start = time.monotonic()
    r = cluster.admin.transfer_leader(target)
    assert r["changed"] and r["leader"] == target and r["previous"] == old
    while cluster.leader() != target:  # raft leader and its term claimed
        assert time.monotonic() - start < 2.5, "leadership did not move within ~2 s"
        time.sleep(0.05)
    # the new term is fenced by the target, not by the leader it replaced
    assert _status(cluster, target)["state"]["leader_node"] == target
    if target != "n4":  # leave n4, the node added at runtime, leading
        assert cluster.admin.transfer_leader("n4")["leader"] == "n4"
        cluster.wait_leader(5)
    assert cluster.leader() == "n4"


def test_leader_cannot_remove_itself_without_transfer(cluster):
    before = _members(cluster)
    with pytest.raises(Refused) as exc:
        cluster.admin.remove_node("n4", transfer=False)
    assert exc.value.code == "is_leader" and "transfer leadership first" in str(exc.value)
    assert _members(cluster) == before and cluster.leader() == "n4"


def test_removed_node_no_longer_counts_toward_quorum(cluster):
    n2 = cluster.nodes[1]
    r = cluster.admin.remove_node(n2.raft)
    assert r["node_id"] == "n2" and r["recorded"] and n2.raft not in r["members"]
    assert len(r["members"]) == 3
    cluster.node_procs["n2"].stop()
    st = _status(cluster, "n4")
    assert len(st["raft"]["members"]) == 3 and "n2" not in {n["id"] for n in st["nodes"]}

    # With n3 down as well, n1 and n4 are 2 of the 3 members: a quorum, for Raft writes and
    # for blob holders, although n4 was configured with 4 nodes and n2 never said goodbye.
    cluster.kill_node("n3")
    _enroll(cluster, "with-two-of-three")
    model = wire.encode_model({"w": np.arange(4, dtype=np.float32)})
    reply = cluster.admin.call("InitModel", {"data": model})
    assert reply["version"] == wire.sha256_hex(model)
    cluster.start_node("n3")
    _wait_answering(cluster, "n3")
    view = _wait_same_view(cluster, ["n1", "n3", "n4"])
    assert "with-two-of-three" in {s["site"] for s in view["sites"]}


def _audit_logs(cluster: LocalCluster, node_ids: list[str], changes: int,
                timeout: float = 20.0) -> list[dict]:
    """Each node's audit log (seq, kind, raft index, hash) and membership payloads, once
    all of them hold at least `changes` membership entries and agree."""
    from coordinator.audit import AuditStore

    deadline = time.monotonic() + timeout
    while True:
        logs = []
        for n in node_ids:
            store = AuditStore(cluster.audit_db(n), migrate=False)
            try:
                entries = list(store.iter_entries())
            finally:
                store.close()
            logs.append({
                "entries": [(e.seq, e.kind, e.raft_index, e.entry_hash) for e in entries],
                "membership": [e.payload for e in entries if e.kind == "membership_changed"]})
        if all(len(g["membership"]) >= changes for g in logs) and all(
                g == logs[0] for g in logs):
            return logs
        assert time.monotonic() < deadline, [len(g["membership"]) for g in logs]
        time.sleep(0.3)


def test_membership_changes_are_identical_in_every_remaining_audit_log(cluster):
    logs = _audit_logs(cluster, ["n1", "n3", "n4"], changes=3)
    payloads = logs[0]["membership"]
    assert [(p["change"], p["node_id"]) for p in payloads] == [
        ("add", "n4"), *[("transfer", p["node_id"]) for p in payloads[1:-1]], ("remove", "n2")]
    assert payloads[-1]["members"] == sorted(n.raft for n in cluster.nodes if n.id != "n2")
    assert all(p["operator"] == "operator" for p in payloads)


def test_removing_the_leader_hands_leadership_over_first(cluster):
    n4 = cluster.nodes[3]
    before = len(_audit_logs(cluster, ["n1", "n3"], 0)[0]["membership"])
    r = _fedraft(cluster, "cluster", "remove-node", n4.raft, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = _last_json(r.stdout)
    assert out["transferred_to"] in ("n1", "n3") and out["node_id"] == "n4"
    assert sorted(out["members"]) == sorted([cluster.nodes[0].raft, cluster.nodes[2].raft])
    cluster.node_procs["n4"].stop()
    _enroll(cluster, "after-n4-left")
    _wait_same_view(cluster, ["n1", "n3"])
    logs = _audit_logs(cluster, ["n1", "n3"], changes=before + 2)
    assert [(p["change"], p["node_id"]) for p in logs[0]["membership"][-2:]] == [
        ("transfer", out["transferred_to"]), ("remove", "n4")]
