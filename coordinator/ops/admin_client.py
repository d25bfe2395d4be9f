"""The operator's connection to the cluster: try each admin endpoint until one answers.

Writes may go to any node (Raft forwards them to the leader); progress of the open
round is read from the leader, which alone holds it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from coordinator import wire
from coordinator.cluster import pki, rpc
from coordinator.cluster.config import ConfigError, read_toml

MAX_SITES_PAGE = 1000
"""The most sites one `Sites` page holds (the server's `site_pages.MAX_LIMIT`)."""


class Unreachable(Exception):
    """No admin endpoint answered."""


class Refused(Exception):
    """The cluster answered with an error."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("error", "refused"))
        self.code = reply.get("code", "error")
        self.reply = reply


@dataclass(frozen=True)
class OperatorConfig:
    endpoints: tuple[str, ...]
    identity: pki.Identity


def load_operator_config(
    config: Path | None, admin: str | None, ca: Path | None, cert: Path | None, key: Path | None,
) -> OperatorConfig:
    """Flags beat environment (FEDRAFT_ADMIN, FEDRAFT_CA, ...) which beats the TOML file."""
    data: dict[str, Any] = {}
    path = config or (Path(os.environ["FEDRAFT_CONFIG"]) if "FEDRAFT_CONFIG" in os.environ else None)
    base = Path.cwd()
    if path is not None:
        data = read_toml(path)
        base = Path(path).resolve().parent
    endpoints: Any = admin or os.environ.get("FEDRAFT_ADMIN") or data.get("admin", {}).get(
        "endpoints")
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise ConfigError("admin.endpoints: required (--admin host:port[,host:port] or "
                          "FEDRAFT_ADMIN)")
    tls = data.get("tls", {})

    def pick(flag: Path | None, env: str, key_name: str) -> Path:
        value = flag or os.environ.get(env) or tls.get(key_name)
        if not value:
            raise ConfigError(f"tls.{key_name}: required (--{key_name} or {env})")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    return OperatorConfig(
        endpoints=tuple(endpoints),
        identity=pki.Identity(pick(ca, "FEDRAFT_CA", "ca"), pick(cert, "FEDRAFT_CERT", "cert"),
                              pick(key, "FEDRAFT_KEY", "key")),
    )


class AdminClient:
    def __init__(self, config: OperatorConfig, timeout: float = 15.0) -> None:
        self.config = config
        self.timeout = timeout
        self._channels: dict[str, wire.Channel] = {}

    def _channel(self, endpoint: str) -> wire.Channel:
        if endpoint not in self._channels:
            self._channels[endpoint] = rpc.channel(endpoint, self.config.identity)
        return self._channels[endpoint]

    def call(self, method: str, message: dict[str, Any] | None = None,
             endpoint: str | None = None, check: bool = True,
             timeout: float | None = None) -> dict[str, Any]:
        message = dict(message or {})
        if method not in ("Status", "Sites", "RoundStatus", "GetBlob"):
            message.setdefault("request_id", uuid.uuid4().hex)
        errors = []
        for ep in [endpoint] if endpoint else self.config.endpoints:
            try:
                reply = self._channel(ep).call(wire.ADMIN_SERVICE, method, message,
                                               timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                errors.append(f"{ep}: {exc.code().name}")
                continue
            if reply.get("code") in wire.TRY_NEXT_NODE and endpoint is None:
                errors.append(f"{ep}: {reply.get('error')}")
                continue
            if check and not reply.get("ok"):
                raise Refused(reply)
            return reply
        raise Unreachable("no admin endpoint answered: " + "; ".join(errors))

    def round_status(self, endpoint: str | None = None, from_round: int = 0,
                     timeout: float | None = None, run: str | None = None) -> dict[str, Any]:
        """`RoundStatus` with every round from `from_round` that the state still holds
        (the last `HISTORY_ROUNDS`; older ones are in the audit log): one reply is bounded
        (`api.STATUS_BYTES`), so this pages on and joins the pages. Rounds are immutable
        once committed, so pages from different nodes join consistently. `run`: that
        run's record is in `runs` however old."""
        also = {"run": run} if run else {}
        reply = self.call("RoundStatus", {"from_round": from_round, **also},
                          endpoint=endpoint, timeout=timeout)
        versions, history = list(reply["versions"]), dict(reply["history"])
        while reply["rounds_to"] is not None and reply["rounds_to"] < reply["rounds_end"]:
            reply = self.call("RoundStatus", {"from_round": reply["rounds_to"] + 1, **also},
                              endpoint=endpoint, timeout=timeout)
            versions += reply["versions"]
            history.update(reply["history"])
        return {**reply, "versions": versions, "history": history,
                "rounds_from": versions[0]["round"] if versions else reply["rounds_from"]}

    def set_budget(self, site: str, epsilon: float, delta: float | None = None) -> dict[str, Any]:
        """Set an enrolled site's privacy budget (operator certificates only); raises
        Refused below what the site has spent, or for a new delta after its first charge."""
        message: dict[str, Any] = {"site": site, "epsilon": epsilon}
        if delta is not None:
            message["delta"] = delta
        return self.call("SetBudget", message)

    def sites(self, after: str | None = None, limit: int | None = None,
              endpoint: str | None = None, **filters: Any) -> dict[str, Any]:
        """One page of enrolled sites in id order after `after` (`Sites`): its `sites`,
        `total`, `enrolled` and `next` cursor. Filters: `online`, `revoked` (booleans) and
        `charges` (list each site's every charge, not only their count)."""
        message = {k: v for k, v in filters.items() if v is not None}
        if after is not None:
            message["after"] = after
        if limit is not None:
            message["limit"] = limit
        return self.call("Sites", message, endpoint=endpoint)

    def all_sites(self, endpoint: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Every enrolled site (matching `filters`), following `Sites` pages to the last."""
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.sites(after, MAX_SITES_PAGE, endpoint, **filters)
            out.extend(page["sites"])
            after = page.get("next")
            if after is None:
                return out

    def site(self, site: str, endpoint: str | None = None) -> dict[str, Any] | None:
        """One site's record with its every charge, or None when it is not enrolled."""
        found = self.call("Sites", {"site": site}, endpoint=endpoint)["sites"]
        return found[0] if found else None

    def leader_call(self, method: str, message: dict[str, Any],
                    timeout: float = 30.0) -> dict[str, Any]:
        """Call `method` on the leader (membership changes run there), following a
        follower's redirect; waits up to `timeout` for a leader to be known."""
        deadline = time.monotonic() + timeout
        endpoint = self.leader_endpoint()
        while endpoint is None and time.monotonic() < deadline:
            time.sleep(0.3)
            endpoint = self.leader_endpoint()
        if endpoint is None:
            raise Refused({"code": "no_leader", "error": "the cluster has no leader"})
        for _ in range(3):
            reply = self.call(method, message, endpoint=endpoint, check=False,
                              timeout=max(self.timeout, timeout + 5.0))
            moved = reply.get("leader_admin")
            if reply.get("code") != "not_leader" or not moved or moved == endpoint:
                break
            endpoint = moved
        if not reply.get("ok"):
            raise Refused(reply)
        return reply

    def add_node(self, node: str, node_admin: str | None = None,
                 timeout: float = 30.0) -> dict[str, Any]:
        """Add the node whose Raft address is `node`; it must already run, started with
        every member and itself as peers. Its admin endpoint is asked who it is: given,
        or found among this client's endpoints (raises Refused `need_admin` if neither)."""
        message: dict[str, Any] = {"node": node, "timeout_s": timeout}
        if node_admin is None:
            node_admin = self._find_admin(node)
        if node_admin is not None:
            message["admin"] = node_admin
        return self.leader_call("AddNode", message, timeout)

    def _find_admin(self, raft: str) -> str | None:
        for ep in self.config.endpoints:
            try:
                status = self.call("Status", endpoint=ep, timeout=min(self.timeout, 5.0))
            except (Refused, Unreachable):
                continue
            if (status.get("self") or {}).get("raft") == raft:
                return ep
        return None

    def remove_node(self, node: str, transfer: bool = True,
                    timeout: float = 30.0) -> dict[str, Any]:
        """Remove a member (host:port or id). The leader cannot remove itself: with
        `transfer` it hands leadership to another member first, else Refused `is_leader`."""
        message = {"node": node, "timeout_s": timeout}
        try:
            return self.leader_call("RemoveNode", message, timeout)
        except Refused as exc:
            if exc.code != "is_leader" or not transfer:
                raise
        moved = self.leader_call("TransferLeader", {"timeout_s": timeout}, timeout)
        reply = self.leader_call("RemoveNode", message, timeout)
        return reply | {"transferred_to": moved["leader"]}

    def transfer_leader(self, node: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Hand leadership to `node` (id or host:port; None: the most caught-up member)."""
        message: dict[str, Any] = {"timeout_s": timeout}
        if node is not None:
            message["node"] = node
        return self.leader_call("TransferLeader", message, timeout)

    def leader_endpoint(self) -> str | None:
        status = self.call("Status")
        return status.get("leader_admin")

    def close(self) -> None:
        """Close the channels; a later call dials afresh (a channel whose node was down
        stays in gRPC's reconnect backoff after the node is back)."""
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
