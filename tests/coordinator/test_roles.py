"""Roles from certificate OUs, enforced both ways on real node processes.

One cluster for the module. Each role gets the calls it may make accepted and every
other call refused with "forbidden" before the handler runs: auditors read, operators
decide, sites use the fleet API only, nodes alone write blobs to peers.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import wire
from coordinator.cluster import pki
from coordinator.demo.cluster import LocalCluster

SITE = "role-site"
READS = ("Status", "RoundStatus", "Sites")
DECISIONS = ("Train", "Enroll", "Revoke", "InitModel", "SetBudget", "Stop")
ADMIN = (*READS, "GetBlob", *DECISIONS, "PutBlob")
FLEET = ("Poll", "GetBlob", "Submit")


@pytest.fixture(scope="module")
def cluster(make_module_cluster):
    c = make_module_cluster("roles", genesis=False)
    c.add_site(SITE)
    return c


def _tls(cluster: LocalCluster, ident: pki.Identity) -> tuple[bytes, bytes, bytes]:
    return (cluster.ca_dir / "ca.pem").read_bytes(), ident.cert.read_bytes(), ident.key.read_bytes()


def _issue(cluster: LocalCluster, role: str, name: str) -> tuple[bytes, bytes, bytes]:
    return _tls(cluster, pki.issue(cluster.ca_dir, cluster.root / "certs" / name, role, name))


def _call(tls: tuple[bytes, bytes, bytes], address: str, service: str, method: str,
          message: dict | None = None) -> dict:
    ch = wire.Channel(address, *tls)
    try:
        return ch.call(service, method, message or {}, timeout=15)
    finally:
        ch.close()


def _admin(cluster: LocalCluster, tls: tuple[bytes, bytes, bytes], method: str,
           message: dict | None = None, node: int = 0) -> dict:
    message = {"request_id": uuid.uuid4().hex, **(message or {})}
    return _call(tls, cluster.nodes[node].admin, wire.ADMIN_SERVICE, method, message)


def _fleet(cluster: LocalCluster, tls: tuple[bytes, bytes, bytes], method: str,
           message: dict | None = None, node: int = 0) -> dict:
    return _call(tls, cluster.nodes[node].fleet, wire.FLEET_SERVICE, method, message)


def _forbidden(reply: dict) -> bool:
    return reply.get("ok") is False and reply.get("code") == "forbidden"


def _model(width: int = 2) -> bytes:
    return wire.encode_model({"w": np.zeros((4, width), np.float32),
                              "b": np.zeros(width, np.float32)})


def test_auditor_reads_but_decides_nothing(cluster):
    auditor = _issue(cluster, "auditor", "regulator")
    for method in READS:
        reply = _admin(cluster, auditor, method)
        assert reply["ok"] is True, (method, reply)
    # reads are local to the node asked: wait until it has applied the enrollment
    deadline = time.monotonic() + 20
    while not any(s["site"] == SITE for s in _admin(cluster, auditor, "Sites")["sites"]):
        assert time.monotonic() < deadline, "node 0 never showed the enrolled site"
        time.sleep(0.2)
    requests = {
        "Train": {"rounds": 1}, "Enroll": {"site": "aud-site", "public_key": "ab" * 32},
        "Revoke": {"site": SITE}, "InitModel": {"data": _model(3)},
        "SetBudget": {"site": SITE, "epsilon": 100.0}, "Stop": {}, "PutBlob": {"data": b"x"},
    }
    for method, message in requests.items():
        reply = _admin(cluster, auditor, method, message)
        assert _forbidden(reply), (method, reply)
        assert "auditor" in reply["error"]
    for method in FLEET:
        assert _forbidden(_fleet(cluster, auditor, method, {"site": SITE})), method
    # nothing an auditor asked for happened
    sites = {s["site"]: s for s in _admin(cluster, auditor, "Sites")["sites"]}
    assert "aud-site" not in sites and not sites[SITE]["revoked"]
    assert sites[SITE]["budget"]["epsilon"] != 100.0
    versions = _admin(cluster, auditor, "RoundStatus")["versions"]
    assert wire.sha256_hex(_model(3)) not in {v["hash"] for v in versions}


def test_operator_decides_but_is_no_site_and_no_node(cluster):
    op = _tls(cluster, cluster.operator)
    for method in READS:
        assert _admin(cluster, op, method)["ok"] is True, method
    other = wire.public_key_hex(Ed25519PrivateKey.generate())
    for method, message in (
        ("Enroll", {"site": "op-site", "public_key": other, "epsilon": 4.0, "delta": 1e-5}),
        ("SetBudget", {"site": "op-site", "epsilon": 6.0}),
        ("InitModel", {"data": _model()}),
        ("Train", {"rounds": 1, "config": {"min_clients": 1, "secure_aggregation": False}}),
        ("Stop", {}),
        ("Revoke", {"site": "op-site"}),
    ):
        reply = _admin(cluster, op, method, message, node=1)  # a follower forwards writes
        assert reply["ok"] is True, (method, reply)
    sites = {s["site"]: s for s in _admin(cluster, op, "Sites")["sites"]}
    assert sites["op-site"]["revoked"] and sites["op-site"]["budget"]["epsilon"] == 6.0
    versions = _admin(cluster, op, "RoundStatus")["versions"]
    assert len(versions) == 1
    assert _admin(cluster, op, "GetBlob", {"hash": versions[0]["hash"]})["data"] == _model()
    put = _admin(cluster, op, "PutBlob", {"data": b"operator blob"})
    assert _forbidden(put) and "operator" in put["error"]
    for method in FLEET:
        assert _forbidden(_fleet(cluster, op, method, {"site": SITE})), method


def test_site_uses_the_fleet_api_only(cluster):
    tls = cluster.site_tls(SITE)
    key = cluster.site_keys[SITE]
    reply = _fleet(cluster, tls, "Poll", wire.sign({"site": SITE, "wait": 0}, key))
    assert reply["ok"] is True and reply["status"] in ("idle", "redirect", "task"), reply
    for method in ADMIN:
        reply = _admin(cluster, tls, method, {"site": SITE, "rounds": 1, "data": b"x"})
        assert _forbidden(reply) and "client" in reply["error"], (method, reply)


def test_node_writes_blobs_but_is_no_site_and_no_operator(cluster):
    node_dir = cluster.root / "n1" / "tls"
    node = _tls(cluster, pki.Identity(cluster.ca_dir / "ca.pem", node_dir / "n1.pem",
                                      node_dir / "n1.key"))
    reply = _admin(cluster, node, "PutBlob", {"data": b"node blob"}, node=2)
    assert reply["ok"] is True and reply["hash"] == wire.sha256_hex(b"node blob")
    assert _admin(cluster, node, "GetBlob", {"hash": reply["hash"]}, node=2)["data"] == b"node blob"
    # people's decisions stay with operators even for a node certificate
    before = cluster.admin.call("Sites")
    for method, message in (("SetBudget", {"site": SITE, "epsilon": 50.0}),
                            ("Enroll", {"site": "by-node", "public_key": "00" * 32}),
                            ("Revoke", {"site": SITE}), ("Train", {"rounds": 1}), ("Stop", {}),
                            ("InitModel", {"data": b"x"})):
        assert _forbidden(_admin(cluster, node, method, message)), method
    assert cluster.admin.call("Sites")["sites"] == before["sites"]
    for method in FLEET:
        assert _forbidden(_fleet(cluster, node, method, {"site": SITE})), method


def test_certificate_of_another_ca_cannot_connect(cluster, tmp_path: Path):
    foreign = tmp_path / "foreign-ca"
    pki.init_ca(foreign)
    ident = pki.issue(foreign, tmp_path / "mallory", "operator", "mallory")
    # it trusts the federation CA, so only the node's check of the client side can fail
    tls = (cluster.ca_dir / "ca.pem").read_bytes(), ident.cert.read_bytes(), ident.key.read_bytes()
    with pytest.raises(grpc.RpcError):
        _admin(cluster, tls, "Status")
