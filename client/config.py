"""Site agent configuration: site.toml with FEDRAFT_<SECTION>_<KEY> overrides."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SiteConfigError(ValueError):
    """A bad site configuration value; the message starts with the dotted key."""


@dataclass(frozen=True)
class SiteConfig:
    site_id: str
    nodes: tuple[str, ...]
    state_dir: Path
    identity_key: Path
    ca: Path
    cert: Path
    key: Path
    task: str | None = "breast_cancer"
    flower_app: str | None = None
    device: str = "auto"
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    poll_wait_s: float = 5.0
    threads: int = 1
    privacy: dict[str, Any] = field(default_factory=dict)


_SECTIONS = {
    "site": {"id": str, "nodes": list, "state_dir": str, "identity_key": str, "poll_wait_s": float},
    "tls": {"ca": str, "cert": str, "key": str},
    "task": {"name": str, "flower_app": str, "device": str, "seed": int, "threads": int},
    "privacy": {"epsilon": float, "delta": float, "planned_rounds": int, "clip_norm": float,
                "sample_rate": float, "local_epochs": int},
    "data": {"dataset": str, "partition": int, "num_partitions": int, "split": str, "alpha": float,
             "seed": int},
}


def load_site_config(path: Path) -> SiteConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SiteConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path}: not valid TOML: {exc}") from None
    base = Path(path).resolve().parent
    values: dict[str, dict[str, Any]] = {}
    for section, keys in _SECTIONS.items():
        got = dict(raw.get(section, {}))
        for key in got:
            if key not in keys:
                raise SiteConfigError(f"{section}.{key}: unknown key")
        for key, kind in keys.items():
            env = os.environ.get(f"FEDRAFT_{section}_{key}".upper())
            if env is not None:
                got[key] = [e.strip() for e in env.split(",")] if kind is list else env
                if kind in (int, float):
                    try:
                        got[key] = kind(env)
                    except ValueError:
                        raise SiteConfigError(f"{section}.{key}: expected {kind.__name__}") from None
            if key in got:
                if kind is float and isinstance(got[key], int) and not isinstance(got[key], bool):
                    got[key] = float(got[key])
                if not isinstance(got[key], kind) or isinstance(got[key], bool):
                    raise SiteConfigError(f"{section}.{key}: expected {kind.__name__}")
        values[section] = got
    for section in raw:
        if section not in _SECTIONS:
            raise SiteConfigError(f"{section}: unknown section")

    def need(section: str, key: str) -> Any:
        if key not in values[section]:
            raise SiteConfigError(f"{section}.{key}: required")
        return values[section][key]

    def path_of(section: str, key: str) -> Path:
        p = Path(need(section, key)).expanduser()
        return p if p.is_absolute() else base / p

    nodes = need("site", "nodes")
    if not nodes or not all(isinstance(n, str) and ":" in n for n in nodes):
        raise SiteConfigError("site.nodes: expected a list of host:port fleet endpoints")
    task = values["task"].get("name")
    flower_app = values["task"].get("flower_app")
    if (task is None) == (flower_app is None):
        raise SiteConfigError("task.name: set exactly one of task.name and task.flower_app")
    return SiteConfig(
        site_id=need("site", "id"),
        nodes=tuple(nodes),
        state_dir=path_of("site", "state_dir"),
        identity_key=path_of("site", "identity_key"),
        ca=path_of("tls", "ca"),
        cert=path_of("tls", "cert"),
        key=path_of("tls", "key"),
        task=task,
        flower_app=flower_app,
        device=values["task"].get("device", "auto"),
        seed=values["task"].get("seed", 0),
        data=values["data"],
        poll_wait_s=values["site"].get("poll_wait_s", 5.0),
        threads=values["task"].get("threads", 1),
        privacy=values["privacy"],
    )
