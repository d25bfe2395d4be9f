"""Fuzz the replicated state machine and the node's API handlers above it.

`apply` gets random commands (the real op names and strangers, plausible and random
fields, and real commands with one change) on a state with enrolled and revoked sites, a
genesis model, an aborted attempt and an open round: each result is ok or a rejection
with a code, and a rejection leaves the state as it was but for the apply counter and the
remembered request id. The node's admin and fleet handlers run through the real rpc
wrapper (unpack, role check, size cap, handler, error mapping) over services whose Raft
is replaced by applying to a local state, without a network: no reply is `internal` (an
escaped exception) and a refused call changes neither the state nor the blob store.
Membership handlers are exercised up to their argument checks (the node is told it is no
leader, so no change is attempted: a real change needs a running cluster).
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from coordinator import wire
from coordinator.api import NodeApi
from coordinator.cluster import pki, rpc
from coordinator.cluster.blobs import BlobService, BlobStore
from coordinator.cluster.config import NodeAddress
from coordinator.cluster.membership import Membership
from coordinator.cluster.presence import OnlineSites, TaskBell
from coordinator.core import state as sm
from coordinator.round.driver import RoundDriver
from privacy.prg import apply_masks
from tests.fuzz.common import count, fuzz, plain, tweak

SITES = ["site-a", "site-b", "site-c", "site-d"]
SITE_KEYS = {s: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
             for i, s in enumerate(SITES)}
V0 = "ab" * 32
CHARGE = {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8.0, "clip_norm": 1.0,
          "epsilon": 0.5, "delta": 1e-5, "epsilon_total": 0.5}
MEMBERS = [{"id": f"n{i}", "raft": f"127.0.0.1:710{i}", "fleet": f"127.0.0.1:720{i}",
            "admin": f"127.0.0.1:730{i}"} for i in (1, 2, 3)]


def _base() -> dict[str, Any]:
    s = sm.initial_state()
    setup = [
        {"op": "claim", "term": 3, "node": "n1"},
        *({"op": "enroll", "site": site, "public_key": wire.public_key_hex(SITE_KEYS[site]),
           "epsilon": 5.0, "request_id": f"enroll-{site}"} for site in SITES),
        {"op": "revoke", "site": "site-d"},
        {"op": "genesis", "version": V0, "size": 120, "holders": ["n1", "n2"], "cluster_size": 3},
        {"op": "train", "rounds": 4, "config": {"min_clients": 2}},
        {"op": "round_open", "term": 3, "round": 1, "attempt": 1, "base": V0,
         "participants": SITES[:3], "seed": "s1"},
        {"op": "round_abort", "term": 3, "round": 1, "attempt": 1, "reason": "leader_change"},
        {"op": "round_open", "term": 3, "round": 1, "attempt": 2, "base": V0,
         "participants": SITES[:3], "seed": "s2"},
        {"op": "membership", "change": "add", "node": MEMBERS[2]["raft"], "members": MEMBERS,
         "request_id": "m-1"},
    ]
    for cmd in setup:
        assert sm.apply(s, cmd)["ok"], cmd
    return s


BASE = _base()
IDLE = copy.deepcopy(BASE)  # the same, with no round open (attempt 1.2 aborted too)
assert sm.apply(IDLE, {"op": "round_abort", "term": 3, "round": 1, "attempt": 2,
                       "reason": "too_few_updates"})["ok"]
VALID = [  # one acceptable command per op, on BASE
    {"op": "barrier"},
    {"op": "claim", "term": 4, "node": "n2"},
    {"op": "enroll", "site": "site-e", "public_key": "cd" * 32, "epsilon": 2.0, "delta": 1e-6},
    {"op": "set_budget", "site": "site-a", "epsilon": 6.0, "operator": "alice"},
    {"op": "revoke", "site": "site-c", "request_id": "r-1"},
    {"op": "genesis", "version": V0, "size": 120, "holders": ["n1", "n2"], "cluster_size": 3},
    {"op": "train", "rounds": 2, "config": {"clip": 0.25, "secure_aggregation": False}},
    {"op": "stop"},
    {"op": "round_open", "term": 3, "round": 1, "attempt": 3, "base": V0,  # on IDLE
     "participants": SITES[:2], "seed": "s3"},
    {"op": "round_abort", "term": 3, "round": 1, "attempt": 2, "reason": "too_few_updates",
     "charges": {"site-a": CHARGE}},
    {"op": "round_commit", "term": 3, "round": 1, "attempt": 2, "version": "ef" * 32,
     "parent": V0, "size": 120, "survivors": SITES[:2], "metrics": {"loss": 0.5},
     "holders": ["n1", "n2"], "cluster_size": 3, "charges": {"site-b": CHARGE}, "node": "n1"},
    {"op": "late_charge", "term": 3, "round": 1, "attempt": 1, "site": "site-a",
     "prior_charges": 0, "charge": CHARGE},
    {"op": "membership", "change": "remove", "node": MEMBERS[2]["raft"], "node_id": "n3",
     "members": MEMBERS[:2], "request_id": "m-2", "operator": "alice"},
]
FIELDS = sorted({k for c in VALID for k in c} | {"request_id"})
PLAUSIBLE = st.one_of(
    st.sampled_from([*SITES, "site-e", V0, "ef" * 32, "n1", "n2", "enroll-site-a", "m-1",
                     MEMBERS[0]["raft"], "add", "remove", "transfer", "", "x" * 129]),
    st.sampled_from([0, 1, 2, 3, 4, -1, 2**63, 0.5, 1e-5, float("nan"), float("inf"), True]),
    st.just(SITES[:3]), st.just(["n1", "n2"]), st.just(["n1", ["n2"]]), st.just([{"a": 1}]),
    st.just({"site-a": CHARGE}), st.just({"site-a": {**CHARGE, "epsilon_total": 99.0}}),
    st.just(MEMBERS), st.just({"clip": 2.0, "bogus": 1}), st.just(CHARGE),
)
COMMANDS = st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(sorted(sm.OPS))},
                          optional={f: st.one_of(PLAUSIBLE, plain())
                                    for f in FIELDS if f != "op"}),
    st.sampled_from(VALID).flatmap(tweak),
    st.dictionaries(st.sampled_from(["op", *FIELDS]) | st.text(max_size=6),
                    st.one_of(PLAUSIBLE, plain(), st.lists(plain(), max_size=3)), max_size=6),
    plain(),
)
BOOKKEEPING = ("seq", "requests", "request_order")


def _domain(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in BOOKKEEPING}


def test_every_valid_command_applies() -> None:
    for cmd in VALID:
        state = copy.deepcopy(IDLE if cmd["op"] == "round_open" else BASE)
        if cmd["op"] == "train":  # one run at a time: the running one is stopped first
            assert sm.apply(state, {"op": "stop"})["ok"]
        assert sm.apply(state, cmd)["ok"], cmd


@fuzz
@given(COMMANDS, st.sampled_from([BASE, IDLE]))
def test_apply_random_commands(cmd: Any, base: dict[str, Any]) -> None:
    count("state.apply commands")
    state = copy.deepcopy(base)
    result = sm.apply(state, cmd)
    assert isinstance(result, dict) and isinstance(result.get("ok"), bool)
    assert state["seq"] == base["seq"] + 1
    if result["ok"]:
        again = copy.deepcopy(base)
        assert sm.apply(again, copy.deepcopy(cmd)) == result and again == state  # deterministic
        return
    assert isinstance(result.get("code"), str) and result.get("error")
    assert _domain(state) == _domain(base)
    grew = set(state["requests"]) - set(base["requests"])
    assert len(grew) <= 1 and all(state["requests"][r] == result for r in grew)


# ---------------------------------------------------------------- the node, without a network

ROOT = Path(tempfile.mkdtemp(prefix="fedraft-fuzz-node-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
pki.init_ca(ROOT / "ca")
PEMS = {role: pki.issue(ROOT / "ca", ROOT / role, role, f"fuzz-{role}").cert.read_bytes()
        for role in ("operator", "auditor", "node", "client")}
SELF = NodeAddress("n1", MEMBERS[0]["raft"], MEMBERS[0]["fleet"], MEMBERS[0]["admin"])


class _Replica:
    """Raft replaced by applying to a local state, as every replica would."""

    def __init__(self, state: dict[str, Any], leader: bool = True) -> None:
        self.machine = state
        self.state = self
        self.leader_now = leader

    def read(self, fn: Any) -> Any:
        return copy.deepcopy(fn(self.machine))

    def submit(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        command = dict(command)
        command.setdefault("request_id", uuid.uuid4().hex)
        return sm.apply(self.machine, command)

    def is_leader(self) -> bool:
        return self.leader_now

    def leader(self) -> str:
        return SELF.raft

    def status(self) -> dict[str, Any]:
        return {"state": "leader", "term": 3, "members": [m["raft"] for m in MEMBERS]}

    def members(self) -> list[str]:
        return [m["raft"] for m in MEMBERS]


class _Config:
    self_addr = SELF
    all_nodes = (SELF,)
    peers = ()


class _Membership(Membership):
    """The real membership over a stand-in replica; blobs count a one-node quorum."""

    def cluster_size(self) -> int:
        return 1


IDENTITY = pki.Identity(ROOT / "ca" / "ca.pem", ROOT / "node" / "fuzz-node.pem",
                        ROOT / "node" / "fuzz-node.key")


def _api(leader: bool) -> NodeApi:
    """The real handlers over stand-in services: Raft applies to a local state, no peers."""
    replica = _Replica(copy.deepcopy(BASE), leader)
    membership = _Membership(replica, _Config(), IDENTITY)  # type: ignore[arg-type]
    blobs = BlobService(BlobStore(ROOT / "blobs"), "n1", rpc.PeerChannels(IDENTITY),
                        peers=lambda: [], cluster_size=lambda: 1)
    online, bell = OnlineSites(), TaskBell()
    driver = RoundDriver("n1", replica, blobs, lambda: 1, online, bell,  # type: ignore[arg-type]
                         masker=apply_masks)
    stopping = threading.Event()
    stopping.set()  # a long poll answers at once
    return NodeApi(SELF, replica, blobs, membership, driver, online, bell,  # type: ignore[arg-type]
                   stopping)


NODE = _api(leader=True)
FOLLOWER = _api(leader=False)  # membership changes stop at their checks: no leader here
HANDLERS: dict[str, tuple[Any, frozenset[str], str]] = {
    **{name: (handler, roles, wire.ADMIN_SERVICE)
       for name, (handler, roles) in NODE.admin_methods().items()},
    **{name: (handler, roles, wire.ADMIN_SERVICE)
       for name, (handler, roles) in FOLLOWER.admin_methods().items()
       if name in ("AddNode", "RemoveNode", "TransferLeader")},
    **{("FleetGetBlob" if name == "GetBlob" else name): (handler, roles, wire.FLEET_SERVICE)
       for name, (handler, roles) in NODE.fleet_methods().items()},
}


def _reset() -> None:
    NODE.replica.machine = copy.deepcopy(BASE)  # type: ignore[attr-defined]


MODEL = wire.encode_model({"w": np.ones((2, 3), np.float32)})
UNSETTLED = {"round": 1, "attempt": 1, "term": 3, "noise_multiplier": 1.1, "sample_rate": 0.25,
             "steps": 8, "clip_norm": 1.0, "delta": 1e-5}
REQUESTS = {  # a valid request per method, for mutation
    "Status": {}, "Sites": {"after": "site-a", "limit": 2, "revoked": False, "charges": True},
    "RoundStatus": {"from_round": 0, "run": "run-1"}, "GetBlob": {"hash": V0},
    "AuditEntries": {"after": 0, "limit": 5},
    "Enroll": {"site": "site-e", "public_key": "cd" * 32, "epsilon": 2.0},
    "Revoke": {"site": "site-c"}, "SetBudget": {"site": "site-a", "epsilon": 6.0, "delta": 1e-5},
    "InitModel": {"data": MODEL}, "Train": {"rounds": 2, "config": {"clip": 0.25}}, "Stop": {},
    "PutBlob": {"data": b"blob"}, "AddNode": {"node": "127.0.0.1:7104", "admin": "h:1"},
    "RemoveNode": {"node": "n2", "timeout_s": 5}, "TransferLeader": {"node": "n2"},
    "Poll": {"site": "site-a", "wait": 0.0, "unsettled": [UNSETTLED]},
    "FleetGetBlob": {"site": "site-a", "hash": V0},
    "Submit": {"site": "site-b", "round": 1, "attempt": 2, "term": 3, "stage": "advertise",
               "secagg": {"client_id": "site-b"}, "unsettled": [UNSETTLED]},
}


class _Context:
    def __init__(self, role: str) -> None:
        self.role = role

    def auth_context(self) -> dict[str, Any]:
        return {"x509_pem_cert": [PEMS[self.role]]}

    def time_remaining(self) -> float | None:
        return None  # a caller without a deadline


@st.composite
def _call(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    method = draw(st.sampled_from(sorted(HANDLERS)))
    roles = HANDLERS[method][1]
    role = draw(st.sampled_from(sorted(roles)) if draw(st.integers(0, 9)) else
                st.sampled_from(sorted(PEMS)))
    msg = draw(st.one_of(tweak(REQUESTS[method]),
                         st.dictionaries(st.text(max_size=8), plain(), max_size=5),
                         st.just(REQUESTS[method])))
    if not isinstance(msg, dict):
        msg = {"value": msg}
    if HANDLERS[method][2] == wire.FLEET_SERVICE and draw(st.booleans()):
        site = msg["site"] if isinstance(msg.get("site"), str) and msg["site"] in SITE_KEYS \
            else "site-a"
        msg = wire.sign({**msg, "site": site}, SITE_KEYS[site])  # past authentication
    return method, role, msg


@fuzz
@given(_call())
def test_node_handlers(call: tuple[str, str, dict[str, Any]]) -> None:
    method, role, msg = call
    count("node admin+fleet handlers")
    _reset()
    handler, roles, service = HANDLERS[method]
    blobs_before = sorted(p.name for p in (ROOT / "blobs").iterdir())
    wrapped = rpc._wrap(handler, roles, service, method.removeprefix("Fleet"))
    try:
        request = wire.pack(msg)
    except (ValueError, TypeError, OverflowError):
        return
    reply = wire.unpack(wrapped(request, _Context(role)))
    assert isinstance(reply.get("ok"), bool)
    assert reply.get("code") != "internal", reply
    state = NODE.replica.machine  # type: ignore[attr-defined]
    if role not in roles:
        assert reply["code"] == "forbidden"
    if not reply["ok"] or service == wire.FLEET_SERVICE or method in (
            "Status", "Sites", "RoundStatus", "GetBlob", "AuditEntries"):
        assert _domain(state) == _domain(BASE), (method, msg, reply)
    if not reply["ok"]:
        assert isinstance(reply.get("code"), str) and reply.get("error")
        assert sorted(p.name for p in (ROOT / "blobs").iterdir()) == blobs_before
