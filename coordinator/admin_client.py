"""The operator's connection to the cluster: try each admin endpoint until one answers.

Writes may go to any node (Raft forwards them to the leader); progress of the open
round is read from the leader, which alone holds it.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from coordinator import pki, rpc, wire
from coordinator.config import ConfigError, read_toml


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
             endpoint: str | None = None, check: bool = True) -> dict[str, Any]:
        message = dict(message or {})
        if method not in ("Status", "Sites", "RoundStatus", "GetBlob"):
            message.setdefault("request_id", uuid.uuid4().hex)
        errors = []
        for ep in [endpoint] if endpoint else self.config.endpoints:
            try:
                reply = self._channel(ep).call(wire.ADMIN_SERVICE, method, message,
                                               timeout=self.timeout)
            except grpc.RpcError as exc:
                errors.append(f"{ep}: {exc.code().name}")
                continue
            if reply.get("code") == "unavailable" and endpoint is None:
                errors.append(f"{ep}: {reply.get('error')}")
                continue
            if check and not reply.get("ok"):
                raise Refused(reply)
            return reply
        raise Unreachable("no admin endpoint answered: " + "; ".join(errors))

    def set_budget(self, site: str, epsilon: float, delta: float | None = None) -> dict[str, Any]:
        """Set an enrolled site's privacy budget (operator certificates only); raises
        Refused below what the site has spent, or for a new delta after its first charge."""
        message: dict[str, Any] = {"site": site, "epsilon": epsilon}
        if delta is not None:
            message["delta"] = delta
        return self.call("SetBudget", message)

    def leader_endpoint(self) -> str | None:
        status = self.call("Status")
        return status.get("leader_admin")

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
