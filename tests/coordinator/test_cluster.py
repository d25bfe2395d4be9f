"""A real federation: 3 node processes, 4 site-agent processes, mTLS on 127.0.0.1.

The tests share one cluster and run in file order, each leaving it with 3 live nodes.
"""

from __future__ import annotations

import json
import os
import signal
import time

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.training.tasks import evaluate_global
from coordinator import wire
from coordinator.demo.cluster import LocalCluster
from coordinator.ops.admin_client import Refused

from .conftest import fedraft_cli as _fedraft

TASK = "breast_cancer"
SITES = [f"site-{i}" for i in range(4)]
FAST = {"fraction": 1.0, "min_clients": 3, "lr": 0.1, "compression": 4.0, "local_epochs": 2,
        "batch_size": 16, "collect_timeout_s": 20.0, "online_wait_s": 15.0,
        "secure_aggregation": True, "clip": 0.5}


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    return make_module_cluster("cluster", sites=SITES, task=TASK, split="dirichlet")


def chain_of(cluster: LocalCluster, endpoint: str | None = None) -> list[dict]:
    return cluster.admin.round_status(endpoint=endpoint)["versions"]


def assert_one_chain(versions: list[dict]) -> None:
    """One version per round, each naming its parent's hash, no hash twice."""
    assert [v["round"] for v in versions] == list(range(len(versions)))
    assert versions[0]["parent"] is None
    for prev, v in zip(versions, versions[1:], strict=False):
        assert v["parent"] == prev["hash"]
    assert len({v["hash"] for v in versions}) == len(versions)


def all_nodes_agree(cluster: LocalCluster, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        views = [chain_of(cluster, n.admin) for n in cluster.nodes]
        if all(v == views[0] for v in views):
            return views[0]
        assert time.monotonic() < deadline, f"nodes disagree: {[len(v) for v in views]}"
        time.sleep(0.3)


def model_at(cluster: LocalCluster, digest: str) -> dict:
    data = cluster.admin.call("GetBlob", {"hash": digest})["data"]
    assert wire.sha256_hex(data) == digest
    return wire.decode_model(data)


def test_three_rounds_and_accuracy_rises(cluster):
    cluster.admin.call("Train", {"rounds": 3, "config": FAST})
    st = cluster.wait_round(3, timeout=90)
    versions = st["versions"]
    assert_one_chain(versions)
    assert len(versions) == 4
    for r in range(1, 4):
        committed = st["history"][str(r)]["committed"]
        assert committed["version"] == versions[r]["hash"]
        assert len(committed["survivors"]) >= 3
    acc0 = evaluate_global(TASK, model_at(cluster, versions[0]["hash"]))
    acc3 = evaluate_global(TASK, model_at(cluster, versions[3]["hash"]))
    assert acc3 >= 0.75 and acc3 > acc0 + 0.25, (acc0, acc3)


def test_unenrolled_client_refused(cluster):
    site = "intruder"
    key = cluster.add_site(site, enroll=False)
    ch = wire.Channel(cluster.nodes[0].fleet, *cluster.site_tls(site))
    reply = ch.call(wire.FLEET_SERVICE, "Poll", wire.sign({"site": site, "wait": 0}, key))
    assert reply["ok"] is False and reply["code"] == "unenrolled"
    # claiming an enrolled site's name without its key fails too
    reply = ch.call(wire.FLEET_SERVICE, "Poll", wire.sign({"site": SITES[0], "wait": 0}, key))
    assert reply["code"] == "bad_signature"
    unsigned = {"site": SITES[0], "wait": 0, "ts": time.time()}
    assert ch.call(wire.FLEET_SERVICE, "Poll", unsigned)["code"] == "unsigned"
    # an operator certificate is not a site certificate
    reply = cluster.admin.call("Status")
    assert reply["ok"]
    with pytest.raises(Refused):
        cluster.admin.call("PutBlob", {"data": b"x"})  # operators may not write blobs
    ch.close()


def _poll_for_task(ch, site, key, tls, timeout=30.0):
    deadline = time.monotonic() + timeout
    addr = None
    while time.monotonic() < deadline:
        reply = ch.call(wire.FLEET_SERVICE, "Poll", wire.sign({"site": site, "wait": 2}, key))
        if reply["status"] == "task":
            return ch, reply["task"]
        if reply["status"] == "redirect" and reply["leader"] and reply["leader"] != addr:
            addr = reply["leader"]
            ch = wire.Channel(addr, *tls)
    raise TimeoutError("no task")


def test_bad_updates_refused_round_completes_with_others(cluster):
    site = "rogue"
    key = cluster.add_site(site)
    tls = cluster.site_tls(site)
    leader = cluster.wait_leader()
    ch = wire.Channel(next(n.fleet for n in cluster.nodes if n.id == leader), *tls)
    before = cluster.admin.round_status()["last_round"]
    cluster.admin.call("Train", {"rounds": 1, "config": {
        **FAST, "collect_timeout_s": 6.0, "secure_aggregation": False, "compression": 1.0,
        "clip": 1000.0}})
    ch, task = _poll_for_task(ch, site, key, tls)
    dim = wire.model_size(model_at(cluster, task["base"]))
    assert task["stage"] == "collect"
    ok_part = {"round": task["round"], "attempt": task["attempt"], "term": task["term"],
               "num_examples": 10, "stage": "collect"}

    def submit(update: bytes, **extra):
        msg = wire.sign({"site": site, **ok_part, "update": update, **extra}, key)
        return ch.call(wire.FLEET_SERVICE, "Submit", msg, timeout=60)

    good = np.zeros(dim, dtype=np.float32)
    assert submit(wire.encode_update(good[:-1]))["code"] == "wrong_length"
    assert submit(wire.encode_update(np.append(good, 0)))["code"] == "wrong_length"
    nan = good.copy()
    nan[3] = np.nan
    assert submit(wire.encode_update(nan))["code"] == "not_finite"
    huge = good.copy()
    huge[0] = 1e12
    assert submit(wire.encode_update(huge))["code"] == "out_of_range"
    assert submit(wire.encode_update(good), num_examples=-5)["code"] == "malformed"
    assert submit(wire.encode_update(good), round=task["round"] - 1)["code"] == "stale_round"
    assert submit(wire.encode_update(good), stage="masked")["code"] == "wrong_stage"
    with pytest.raises(grpc.RpcError) as exc:
        submit(b"\0" * (wire.MAX_MESSAGE_BYTES + 4096))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the round goes on with the well-behaved sites
    st = cluster.wait_round(before + 1, timeout=60)
    committed = st["history"][str(before + 1)]["committed"]
    assert site in committed["participants"] and site not in committed["survivors"]
    assert len(committed["survivors"]) >= 3
    assert_one_chain(st["versions"])
    reply = _forged_advert_is_refused(cluster, site, key, tls)
    cluster.admin.call("Revoke", {"site": site})
    reply = ch.call(wire.FLEET_SERVICE, "Poll", wire.sign({"site": site, "wait": 0}, key))
    assert reply["code"] == "revoked"
    ch.close()


def _forged_advert_is_refused(cluster, site, key, tls):
    """In a secure round, an advertisement signed by a key other than the enrolled one is
    refused, and the round completes with the other sites."""
    from privacy import secagg
    from privacy.plan import make_round_plan

    before = cluster.admin.round_status()["last_round"]
    cluster.admin.call("Train", {"rounds": 1, "config": {**FAST, "stage_timeout_s": 4.0}})
    leader = cluster.wait_leader()
    ch = wire.Channel(next(n.fleet for n in cluster.nodes if n.id == leader), *tls)
    ch, task = _poll_for_task(ch, site, key, tls)
    assert task["stage"] == "advertise" and task["config"]["secure_aggregation"]
    dim = wire.model_size(model_at(cluster, task["base"]))
    cfg = task["config"]
    plan = make_round_plan(
        federation=task["federation"], round_number=task["round"], attempt=task["attempt"],
        term=task["term"], seed=bytes.fromhex(task["seed"]), participants=task["participants"],
        dim=dim, last_global_change=None, compression=cfg["compression"], clip=cfg["clip"],
        max_weight=cfg["max_examples"], secure=True, threshold=cfg["threshold"])
    # a task carries the identity keys of the site's neighbours and its own, not everyone's
    assert set(task["identity_keys"]) == plan.secagg.neighbours[site] | {site}
    impostor = Ed25519PrivateKey.generate()
    keys = {s: bytes.fromhex(k) for s, k in task["identity_keys"].items()}
    forged = secagg.SecAggClient(plan.secagg, site, impostor, keys, os.urandom).advertise()
    msg = wire.sign({"site": site, "round": task["round"], "attempt": task["attempt"],
                     "term": task["term"], "stage": "advertise", "secagg": forged.to_wire()}, key)
    reply = ch.call(wire.FLEET_SERVICE, "Submit", msg)
    assert reply["code"] == "bad_secagg" and "BadSignature" in reply["error"]
    st = cluster.wait_round(before + 1, timeout=60)
    committed = st["history"][str(before + 1)]["committed"]
    assert site not in committed["survivors"] and len(committed["survivors"]) >= 3
    ch.close()
    return reply


def _restart(cluster: LocalCluster, node_id: str) -> None:
    cluster.start_node(node_id)
    deadline = time.monotonic() + 20
    while cluster.status(node_id) is None:
        assert time.monotonic() < deadline, f"{node_id} did not come back"
        time.sleep(0.2)


def test_kill_leader_between_rounds(cluster):
    before = cluster.wait_round(0)["last_round"]
    victim = cluster.wait_leader()
    cluster.kill_node(victim, signal.SIGKILL)
    new = cluster.wait_leader(timeout=20, exclude=victim)
    assert new != victim
    cluster.admin.call("Train", {"rounds": 2, "config": FAST})
    st = cluster.wait_round(before + 2, timeout=60)
    assert_one_chain(st["versions"])
    assert st["history"][str(before + 1)]["committed"]["leader"] == new
    _restart(cluster, victim)
    assert_one_chain(all_nodes_agree(cluster))


def test_kill_leader_mid_round(cluster):
    before = cluster.wait_round(0)["last_round"]
    cluster.admin.call("Train", {"rounds": 3, "config": FAST})
    deadline = time.monotonic() + 30
    victim = opened = None
    while time.monotonic() < deadline and victim is None:
        leader = cluster.leader()
        if leader:
            st = cluster.admin.round_status(endpoint=cluster.admin_of(leader))
            if st["open"] is not None:
                cluster.kill_node(leader, signal.SIGKILL)
                victim, opened = leader, st["open"]
        time.sleep(0.01)
    assert victim is not None, "never saw an open round"
    st = cluster.wait_round(before + 3, timeout=90)
    assert_one_chain(st["versions"])
    interrupted = st["history"][str(opened["round"])]
    assert interrupted["committed"] is not None
    aborted = [a for a in interrupted["aborted"] if a["attempt"] == opened["attempt"]]
    assert aborted and aborted[0]["reason"] == "leader_change"
    assert interrupted["committed"]["attempt"] > opened["attempt"]
    assert interrupted["committed"]["leader"] != victim
    _restart(cluster, victim)
    assert_one_chain(all_nodes_agree(cluster))


def test_follower_restarted_from_disk_catches_up(cluster):
    leader = cluster.wait_leader()
    follower = next(n.id for n in cluster.nodes if n.id != leader)
    cluster.kill_node(follower, signal.SIGKILL)
    status = cluster.admin.round_status()
    before = status["last_round"]
    # damage done while it is down: it checks every blob it holds when it starts
    genesis = status["versions"][0]["hash"]
    _damage(cluster.blob_dir(follower) / genesis)
    cluster.admin.call("Train", {"rounds": 2, "config": FAST})
    st = cluster.wait_round(before + 2, timeout=60)
    _restart(cluster, follower)
    chain = all_nodes_agree(cluster)
    assert chain == st["versions"]
    # the restarted node also fetched the blobs committed while it was down
    deadline = time.monotonic() + 20
    for v in chain:
        while True:
            try:
                data = cluster.admin.call("GetBlob", {"hash": v["hash"]},
                                          endpoint=cluster.admin_of(follower))["data"]
                assert wire.sha256_hex(data) == v["hash"]
                break
            except Refused:
                assert time.monotonic() < deadline, f"{follower} lacks blob {v['hash'][:12]}"
                time.sleep(0.3)
    assert len(list((cluster.blob_dir(follower) / "quarantine").glob(genesis + ".*"))) == 1


def test_forged_site_key_cannot_submit(cluster):
    """A certificate alone is not enough: updates must be signed by the enrolled key."""
    impostor = Ed25519PrivateKey.generate()
    ch = wire.Channel(cluster.nodes[0].fleet, *cluster.site_tls(SITES[0]))
    msg = wire.sign({"site": SITES[0], "round": 1, "attempt": 1, "term": 1, "num_examples": 1,
                     "update": b""}, impostor)
    assert ch.call(wire.FLEET_SERVICE, "Submit", msg)["code"] == "bad_signature"
    ch.close()


def test_every_node_writes_the_same_verifiable_audit_log(cluster):
    """After failovers and restarts, all nodes' SQL audit logs hold identical entries."""
    from coordinator.audit import AuditStore
    from coordinator.audit.keys import load_public_key

    chain = all_nodes_agree(cluster)
    pinned = load_public_key(cluster.audit_public_key())
    heads = []
    deadline = time.monotonic() + 20
    for n in cluster.nodes:
        while True:
            store = AuditStore(cluster.audit_db(n.id), migrate=False)
            try:
                committed = [e for e in store.iter_entries() if e.kind == "round_committed"]
                if len(committed) == len(chain) - 1:
                    report = store.verify(genesis_key=pinned, blobs=cluster.blob_dir(n.id))
                    assert report.ok, (n.id, report.reason, report.first_bad_seq)
                    heads.append([(e.seq, e.entry_hash) for e in store.iter_entries()])
                    assert [e.payload["version"] for e in committed] == [v["hash"] for v in chain[1:]]
                    break
            finally:
                store.close()
            assert time.monotonic() < deadline, f"{n.id} audit log incomplete"
            time.sleep(0.3)
    assert heads[0] == heads[1] == heads[2]



def _committed_head(cluster: LocalCluster, timeout: float = 20.0) -> dict:
    """The audit head every node's state holds once the leader has published its log's."""
    from coordinator.audit import AuditStore

    deadline = time.monotonic() + timeout
    while True:
        store = AuditStore(cluster.audit_db(cluster.wait_leader()), migrate=False)
        try:
            size = len(store)
        finally:
            store.close()
        heads = [cluster.admin.call("Status", endpoint=n.admin)["state"]["audit_head"]
                 for n in cluster.nodes]
        if heads[0] is not None and heads[0]["tree_size"] == size and heads.count(heads[0]) == 3:
            return heads[0]
        assert time.monotonic() < deadline, f"no committed head of {size} entries: {heads}"
        time.sleep(0.3)


def test_a_tail_cut_with_its_checkpoints_fails_against_the_committed_head(cluster, tmp_path):
    """The leader commits its signed audit head through Raft; against it, a node's log whose
    tail and checkpoint rows were deleted fails verification without --expect-size."""
    import sqlite3

    head = _committed_head(cluster)
    head_file = tmp_path / "head.json"
    got = _fedraft(cluster, "cluster", "audit-head", "--out", str(head_file), "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["audit_head"]["tree_size"] >= head["tree_size"]
    copy = tmp_path / "copy.db"
    node = cluster.nodes[2].id
    with sqlite3.connect(cluster.audit_db(node).removeprefix("sqlite:///")) as src, \
            sqlite3.connect(copy) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    intact = _fedraft(cluster, "audit", "verify", "--db", url, "--no-charges", "--head",
                      str(head_file))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    size = json.loads(head_file.read_text())["audit_head"]["tree_size"]
    with sqlite3.connect(copy) as db:
        for table in ("audit_entries", "audit_checkpoints"):
            db.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        db.execute("DELETE FROM audit_entries WHERE seq >= ?", (size - 2,))
        db.execute("DELETE FROM audit_checkpoints")
    unpinned = _fedraft(cluster, "audit", "verify", "--db", url, "--no-charges")
    assert unpinned.returncode == 3  # self-consistent: only the head can tell
    cut = _fedraft(cluster, "audit", "verify", "--db", url, "--no-charges", "--head",
                   str(head_file))
    assert cut.returncode == 1 and "tail deleted" in cut.stdout, cut.stdout


def test_round_start_cli_sets_any_round_key(cluster):
    before = cluster.admin.round_status()
    bad = _fedraft(cluster, "round", "start", "--rounds", "1", "--set", "no_such_key=1", "--json")
    assert bad.returncode == 1 and "no_such_key" in bad.stdout + bad.stderr
    malformed = _fedraft(cluster, "round", "start", "--set", "residual_decay", "--json")
    assert malformed.returncode == 2 and "KEY=VALUE" in malformed.stdout + malformed.stderr
    out_of_range = _fedraft(cluster, "round", "start", "--set", "residual_decay=1.5", "--json")
    assert out_of_range.returncode == 1 and "residual_decay" in out_of_range.stdout + out_of_range.stderr
    # refused requests changed nothing
    assert cluster.admin.round_status()["target_round"] == before["target_round"]

    ok = _fedraft(cluster, "round", "start", "--rounds", "1", "--set", "residual_decay=0.9",
                  "--set", "server_lr=1.5", "--set", "compression=4.0", "--set", "lr_final=0.5",
                  "--json")
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["last_round"] == summary["target_round"] == before["last_round"] + 1
    st = cluster.admin.round_status()
    assert st["config"]["residual_decay"] == 0.9 and st["config"]["server_lr"] == 1.5
    assert st["config"]["lr_final"] == 0.5
    assert_one_chain(st["versions"])


def _damage(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_blob_is_never_served_and_heals_on_every_node(cluster):
    st = cluster.admin.round_status()
    head = st["versions"][-1]["hash"]
    leader = cluster.wait_leader()
    follower = next(n.id for n in cluster.nodes if n.id != leader)
    for node in (leader, follower):
        _damage(cluster.blob_dir(node) / head)
    # a damaged copy is refused, not served, and set aside
    r = cluster.admin.call("GetBlob", {"hash": head}, endpoint=cluster.admin_of(follower),
                           check=False)
    assert not r["ok"] and r["code"] == "not_found" and "corrupt" in r["error"]
    # the leader's round reads its damaged base, fetches a good copy and commits
    cluster.admin.call("Train", {"rounds": 1, "config": FAST})
    after = cluster.wait_round(st["last_round"] + 1, timeout=90)
    assert after["versions"][-2]["hash"] == head
    assert_one_chain(after["versions"])
    for node in (leader, follower):  # both healed from a peer; the damage kept for a post-mortem
        path = cluster.blob_dir(node) / head
        deadline = time.monotonic() + 20
        while not (path.exists() and wire.sha256_hex(path.read_bytes()) == head):
            assert time.monotonic() < deadline, f"{node}'s copy of {head[:12]} never healed"
            time.sleep(0.2)
        kept = (cluster.blob_dir(node) / "quarantine").glob(head + ".*")
        assert len(list(kept)) == 1
    assert model_at(cluster, head)  # and it is served again
