"""Site agent configuration: site.toml with FEDRAFT_<SECTION>_<KEY> overrides.

Everything is checked here, when the file is read, so that a bad value is refused naming
its key, not deep inside training: types, ranges, endpoints, the site id (the wire
schema's `SITE_ID`, as enrollment and certificates know it) and which [privacy] keys apply
to the task the site runs (`PrivacyConfig.from_section`).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator import wire


class SiteConfigError(ValueError):
    """A bad site configuration value; the message starts with the dotted key."""


@dataclass(frozen=True)
class PrivacyConfig:
    """The site's own privacy budget ([privacy]) and how its DP trainer spends it; the DP
    defaults are written here and nowhere else.

    A built-in task trains with record-level DP-SGD (all six keys apply); a Flower app
    gets client-level DP, where `sample_rate` and `local_epochs` mean nothing."""

    epsilon: float
    delta: float = 1e-5
    planned_rounds: int = 10
    clip_norm: float = 1.0
    sample_rate: float | None = None
    local_epochs: int | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any], *, flower_app: bool) -> PrivacyConfig | None:
        """The [privacy] section (its types and ranges checked by the loader) of a site that
        hosts a Flower app or runs a built-in task; None when the site trains without DP."""
        if not section:
            return None
        if flower_app:
            # A Flower app trains by itself, so only keys of client-level DP apply;
            # record-level keys would silently promise what is not done.
            for key in ("sample_rate", "local_epochs"):
                if key in section:
                    raise SiteConfigError(
                        f"privacy.{key}: applies to record-level DP-SGD of built-in tasks; a "
                        "Flower app gets client-level DP (its whole update is clipped and "
                        "noised once a round)")
            if "epsilon" not in section:
                raise SiteConfigError("privacy.epsilon: required for client-level DP of a Flower app")
        elif "epsilon" not in section:
            return None  # a built-in task without a budget trains without DP, as it always has
        return cls(**section)


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
    app_dir: Path | None = None
    device: str = "auto"
    seed: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    poll_wait_s: float = 5.0
    threads: int = 1
    privacy: PrivacyConfig | None = None


_SECTIONS = {
    "site": {"id": str, "nodes": list, "state_dir": str, "identity_key": str, "poll_wait_s": float},
    "tls": {"ca": str, "cert": str, "key": str},
    "task": {"name": str, "flower_app": str, "app_dir": str, "device": str, "seed": int, "threads": int},
    "privacy": {"epsilon": float, "delta": float, "planned_rounds": int, "clip_norm": float,
                "sample_rate": float, "local_epochs": int},
    "data": {"dataset": str, "partition": int, "num_partitions": int, "split": str, "alpha": float,
             "seed": int},
}


_RANGES: dict[tuple[str, str], tuple[Callable[[float], bool], str]] = {
    # a value outside its range is refused here, naming its key, not deep inside training
    ("site", "poll_wait_s"): (lambda v: v >= 0, ">= 0"),
    ("task", "seed"): (lambda v: v >= 0, ">= 0"),
    ("task", "threads"): (lambda v: 1 <= v <= 1024, "in [1, 1024]"),
    ("privacy", "epsilon"): (lambda v: v > 0, "> 0"),
    ("privacy", "delta"): (lambda v: 0 < v < 1, "in (0, 1)"),
    ("privacy", "planned_rounds"): (lambda v: v >= 1, ">= 1"),
    ("privacy", "clip_norm"): (lambda v: v > 0, "> 0"),
    ("privacy", "sample_rate"): (lambda v: 0 < v <= 1, "in (0, 1]"),
    ("privacy", "local_epochs"): (lambda v: v >= 1, ">= 1"),
    ("data", "partition"): (lambda v: v >= 0, ">= 0"),
    ("data", "num_partitions"): (lambda v: v >= 1, ">= 1"),
    ("data", "alpha"): (lambda v: v > 0, "> 0"),
    ("data", "seed"): (lambda v: v >= 0, ">= 0"),
}
_ENDPOINT = re.compile(r"[A-Za-z0-9_.-]{1,253}:[0-9]{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}")


def _check_range(section: str, key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise SiteConfigError(f"{section}.{key}: expected a finite number, got {value!r}")
    rule = _RANGES.get((section, key))
    if rule is not None and not rule[0](value):
        raise SiteConfigError(f"{section}.{key}: must be {rule[1]}, got {value!r}")


def _endpoint(value: Any) -> bool:
    return (isinstance(value, str) and _ENDPOINT.fullmatch(value) is not None
            and 0 < int(value.rpartition(":")[2]) < 65536)


def _task_source(section: Mapping[str, Any], base: Path) -> tuple[str | None, str | None, Path | None]:
    """(built-in task, Flower app, app directory); paths are relative to site.toml's directory.
    A Flower app without ':' is its `flwr new` project directory."""
    task, flower_app, app_dir = section.get("name"), section.get("flower_app"), section.get("app_dir")
    if (task is None) == (flower_app is None):
        raise SiteConfigError("task.name: set exactly one of task.name and task.flower_app")
    if app_dir is not None and flower_app is None:
        raise SiteConfigError("task.app_dir: goes with task.flower_app (the directory its package is in)")
    if flower_app is not None and ":" not in flower_app:
        flower_app = str(base / Path(flower_app).expanduser())
    return task, flower_app, base / Path(app_dir).expanduser() if app_dir is not None else None


def load_site_config(path: Path) -> SiteConfig:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise SiteConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SiteConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path}: not valid TOML: {exc}") from None
    base = Path(path).resolve().parent
    for section, table in raw.items():
        if section not in _SECTIONS:
            raise SiteConfigError(f"{section}: unknown section")
        if not isinstance(table, dict):
            raise SiteConfigError(f"{section}: expected a table ([{section}])")
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
                _check_range(section, key, got[key])
        values[section] = got

    def need(section: str, key: str) -> Any:
        if key not in values[section]:
            raise SiteConfigError(f"{section}.{key}: required")
        return values[section][key]

    def path_of(section: str, key: str) -> Path:
        p = Path(need(section, key)).expanduser()
        return p if p.is_absolute() else base / p

    nodes = need("site", "nodes")
    if not nodes or not all(_endpoint(n) for n in nodes):
        raise SiteConfigError("site.nodes: expected a list of host:port fleet endpoints")
    if not wire.SITE_ID.fullmatch(need("site", "id")):
        raise SiteConfigError("site.id: 1-64 letters, digits, '_', '.' or '-', not starting "
                              "with a punctuation mark")
    data = values["data"]
    if data.get("partition", 0) >= data.get("num_partitions", 1):
        raise SiteConfigError("data.partition: must be below data.num_partitions")
    task, flower_app, app_dir = _task_source(values["task"], base)
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
        app_dir=app_dir,
        device=values["task"].get("device", "auto"),
        seed=values["task"].get("seed", 0),
        data=values["data"],
        poll_wait_s=values["site"].get("poll_wait_s", 5.0),
        threads=values["task"].get("threads", 1),
        privacy=PrivacyConfig.from_section(values["privacy"], flower_app=flower_app is not None),
    )
