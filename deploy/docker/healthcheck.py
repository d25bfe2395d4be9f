#!/usr/bin/env python3
"""fedraft-healthcheck: ask this node's admin API for its Status over mutual TLS.

Installed in the node image as /usr/local/bin/fedraft-healthcheck and used by the
Dockerfile's HEALTHCHECK and the Kubernetes readiness probe. It reads the node's own
TOML (argument, else FEDRAFT_NODE_CONFIG, else /etc/fedraft/node.toml) with the
project's config loader, so FEDRAFT_<SECTION>_<KEY> overrides apply as they do for the
node, and calls `Status` on `[node] admin` with the node's own certificate (the node
role may read the admin API). Exit 0 when the node answers, 1 when it does not or
(with --require-leader) when it knows no leader, 2 when the configuration is unusable.

It never needs the Raft password; when none is in the environment a placeholder is
set so that the loader accepts a config that takes it from FEDRAFT_RAFT_PASSWORD_FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "/etc/fedraft/node.toml"
WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def admin_target(admin: str) -> str:
    """Where to dial `[node] admin`: a wildcard bind address becomes loopback."""
    host, _, port = admin.rpartition(":")
    if host in WILDCARDS:
        return f"127.0.0.1:{port}"
    return admin


def status(config_path: Path, timeout: float) -> dict[str, Any]:
    os.environ.setdefault("FEDRAFT_RAFT_PASSWORD", "health-check-placeholder")
    from coordinator.cluster.config import load_node_config
    from coordinator.wire import ADMIN_SERVICE, Channel

    cfg = load_node_config(config_path)
    target = admin_target(cfg.self_addr.admin)
    channel = Channel(target, cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes())
    try:
        reply = channel.call(ADMIN_SERVICE, "Status", {}, timeout=timeout)
    finally:
        channel.close()
    raft = reply.get("raft") or {}
    return {"ok": bool(reply.get("ok")), "node": reply.get("node"), "target": target,
            "state": raft.get("state"), "term": raft.get("term"), "leader": reply.get("leader")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedraft-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path,
                        default=Path(os.environ.get("FEDRAFT_NODE_CONFIG", DEFAULT_CONFIG)))
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the call")
    parser.add_argument("--require-leader", action="store_true",
                        help="unhealthy while the node knows no leader")
    args = parser.parse_args(argv)
    try:
        result = status(args.config, args.timeout)
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        print(json.dumps({"ok": False, "error": f"configuration: {exc}"}))
        return 2
    except Exception as exc:  # grpc.RpcError and anything the transport raises
        code = getattr(exc, "code", None)
        reason = code().name if callable(code) else type(exc).__name__
        print(json.dumps({"ok": False, "error": f"no answer: {reason}"}))
        return 1
    if args.require_leader and not result["leader"]:
        result["ok"] = False
    print(json.dumps(result, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
