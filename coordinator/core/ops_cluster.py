"""Operations of the cluster itself: leadership claims (the fence), membership records and
the signed audit head."""

from __future__ import annotations

import re
from typing import Any

from coordinator import wire
from coordinator.core.checks import Command, Rejected, need, operator_name

State = dict[str, Any]
Result = dict[str, Any]

HOST_PORT = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,253}:[0-9]{1,5}$")
MAX_LEADER_HISTORY = 200
MAX_MEMBERS = 64
MEMBERSHIP_CHANGES = ("add", "remove", "transfer")


def barrier(state: State, cmd: Command) -> Result:
    """Changes nothing: a write that commits once everything before it has."""
    return {}


def claim(state: State, cmd: Command) -> Result:
    """A new leader's first command: its term becomes the fence every round command meets."""
    term = need(cmd, "term", int)
    node = need(cmd, "node", str)
    if term < state["fence_term"]:
        raise Rejected("stale_term", f"claim for term {term} after fence {state['fence_term']}")
    if term == state["fence_term"]:
        if state["leader"] != node:
            raise Rejected("term_taken", f"term {term} already claimed by {state['leader']}")
        return {"claimed": term}
    state["fence_term"] = term
    state["leader"] = node
    state["leader_history"].append({"term": term, "node": node, "seq": state["seq"]})
    del state["leader_history"][:-MAX_LEADER_HISTORY]
    return {"claimed": term, "new": True}


def _host_port(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HOST_PORT.match(value) or not 0 < int(
            value.rpartition(":")[2]) < 65536:
        raise Rejected("malformed", f"{what} must be host:port, got {value!r}")
    return value


def _member(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or set(raw) != {"id", "raft", "fleet", "admin"}:
        raise Rejected("malformed", "each member needs exactly id, raft, fleet and admin")
    node_id = raw["id"]
    if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
        raise Rejected("malformed", f"bad node id {node_id!r}")
    return {"id": node_id, **{k: _host_port(raw[k], f"member {node_id} {k}")
                              for k in ("raft", "fleet", "admin")}}


def membership(state: State, cmd: Command) -> Result:
    """Record a Raft membership change the leader has already made (pysyncobj's own
    entry is not one of our commands): the member list after it, for the audit log and
    so that every node, a newly added one included, knows every member's endpoints.

    The list is what the leader observed, not derived from the previous record: a
    leader that died between the change and this record leaves a gap the next record
    closes. A request id is required, so a retried record is applied once.
    """
    if not isinstance(cmd.get("request_id"), str):
        raise Rejected("malformed", "a membership record needs a request_id")
    change = cmd.get("change")
    if change not in MEMBERSHIP_CHANGES:
        raise Rejected("malformed", f"change must be one of {', '.join(MEMBERSHIP_CHANGES)}")
    node = _host_port(cmd.get("node"), "node")
    raw = need(cmd, "members", list)
    if not 0 < len(raw) <= MAX_MEMBERS:
        raise Rejected("malformed", f"members must list 1 to {MAX_MEMBERS} nodes")
    members = sorted((_member(m) for m in raw), key=lambda m: m["raft"])
    rafts = [m["raft"] for m in members]
    if len(set(rafts)) != len(rafts) or len({m["id"] for m in members}) != len(members):
        raise Rejected("malformed", "members repeat a node id or Raft address")
    if (node in rafts) == (change == "remove"):
        raise Rejected("malformed", f"after {change} of {node}, it must "
                       f"{'not ' if change == 'remove' else ''}be a member")
    node_id = cmd.get("node_id", node)
    if change != "remove":
        node_id = next(m["id"] for m in members if m["raft"] == node)
    elif not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
        raise Rejected("malformed", f"bad node id {node_id!r}")
    operator = operator_name(cmd)
    state["members"] = members
    return {"change": change, "node": node, "node_id": node_id, "members": rafts,
            "operator": operator}


AUDIT_HEAD_FIELDS = frozenset({"tree_size", "root_hash", "key_id", "signature"})
KEY_ID = re.compile(r"[0-9a-f]{16}")
SIGNATURE_HEX = re.compile(r"[0-9a-f]{2,256}")


def audit_head(state: State, cmd: Command) -> Result:
    """Keep the newest signed audit head. Heads only grow: a smaller or equal one (a new
    leader whose log has not caught up, a replay) is refused and changes nothing. The
    signature is the verifier's to check; here only the shape is."""
    head = need(cmd, "head", dict)
    if set(head) != AUDIT_HEAD_FIELDS:
        raise Rejected("malformed", f"an audit head has exactly {sorted(AUDIT_HEAD_FIELDS)}")
    size = need(head, "tree_size", int)
    if size <= 0:
        raise Rejected("malformed", "audit head tree_size must be positive")
    wire.hex64(head["root_hash"], "audit head root_hash")
    if not (isinstance(head["key_id"], str) and KEY_ID.fullmatch(head["key_id"])):
        raise Rejected("malformed", "audit head key_id must be 16 hex digits")
    if not (isinstance(head["signature"], str) and SIGNATURE_HEX.fullmatch(head["signature"])):
        raise Rejected("malformed", "audit head signature must be hex")
    current = state.get("audit_head")
    if current is not None and size <= current["tree_size"]:
        raise Rejected("stale", f"the committed audit head already covers {current['tree_size']}"
                       f" entries (this one {size})")
    state["audit_head"] = dict(head)
    return {"tree_size": size}
