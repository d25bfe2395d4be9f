"""The round configuration of a training run: defaults, validation and a typed view.

The replicated state keeps the configuration as a plain map (it is snapshotted, audited
by digest and printed by the CLI); `validate_round_config` is the only way into it, and
`RoundConfig` is how the leader reads it. `site_config` is the part sites see in their
task (`wire.TaskConfig`): local training and the update plan, not the leader's timers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from coordinator import wire
from coordinator.core.checks import Rejected

DEFAULT_ROUND_CONFIG: dict[str, Any] = {
    "clients": 0,  # sites sampled per round; 0 means use `fraction`
    "fraction": 1.0,
    "min_clients": 2,
    "local_epochs": 1,
    "lr": 0.05,
    "batch_size": 32,
    "collect_timeout_s": 60.0,
    "replicate_timeout_s": 10.0,
    "online_wait_s": 30.0,
    "stage_timeout_s": 20.0,  # each secure-aggregation key stage
    "secure_aggregation": True,
    "compression": 10.0,  # upload 1/compression of the coordinates (1.0: dense)
    "error_feedback": True,
    "clip": 0.5,  # per-coordinate clip of the sent update
    "residual_decay": 1.0,  # error feedback keeps this share of what was not sent (<= 1)
    "server_lr": 1.0,  # new global = base + server_lr * weighted mean update (1: FedAvg)
    "lr_final": 1.0,  # local lr decays linearly to lr * lr_final over the run (1: constant)
    "max_examples": 10000.0,  # example weight cap (weights are encoded in (0, 1])
    "threshold": 0,  # SecAgg+ threshold; 0 picks degree // 2 + 1
    "max_attempts": 20,  # failed attempts of one round before the run stops (0: never)
}


@dataclass(frozen=True)
class RoundConfig:
    """A validated round configuration, read by attribute (see DEFAULT_ROUND_CONFIG)."""

    clients: int
    fraction: float
    min_clients: int
    local_epochs: int
    lr: float
    batch_size: int
    collect_timeout_s: float
    replicate_timeout_s: float
    online_wait_s: float
    stage_timeout_s: float
    secure_aggregation: bool
    compression: float
    error_feedback: bool
    clip: float
    residual_decay: float
    server_lr: float
    lr_final: float
    max_examples: float
    threshold: int
    max_attempts: int

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> RoundConfig:
        """The typed view of a configuration the state machine has validated; keys that
        an older state lacks take their defaults."""
        return cls(**{f.name: config.get(f.name, DEFAULT_ROUND_CONFIG[f.name])
                      for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def site_config(config: RoundConfig, lr: float | None = None) -> wire.TaskConfig:
    """What sites see of the configuration, with this round's scheduled `lr`."""
    view = {k: getattr(config, k) for k in wire.TASK_CONFIG_KEYS}
    if lr is not None:
        view["lr"] = lr
    return wire.TaskConfig(**view)


def validate_round_config(value: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Merge a partial round configuration onto `base`, rejecting unknown or bad keys."""
    if not isinstance(value, dict):
        raise Rejected("malformed", "config must be a map")
    out = dict(base)
    for key, v in value.items():
        out[key] = _checked_value(key, v)
    _check_together(out)
    return out


def _checked_value(key: Any, v: Any) -> Any:
    """One key's value, of its default's type and in its basic range."""
    if key not in DEFAULT_ROUND_CONFIG:
        raise Rejected("bad_config", f"unknown round config key {key!r}")
    default = DEFAULT_ROUND_CONFIG[key]
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise Rejected("bad_config", f"round config {key!r} must be true or false")
    elif isinstance(default, int):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise Rejected("bad_config", f"round config {key!r} must be an integer >= 0")
    elif isinstance(default, float):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise Rejected("bad_config", f"round config {key!r} must be a number")
        v = float(v)
        if v <= 0:
            raise Rejected("bad_config", f"round config {key!r} must be > 0")
    return v


def _check_together(out: dict[str, Any]) -> None:
    """Ranges and combinations that single keys cannot express."""
    if out["fraction"] > 1.0:
        raise Rejected("bad_config", "round config 'fraction' must be in (0, 1]")
    if out["min_clients"] < 1 or out["local_epochs"] < 1 or out["batch_size"] < 1:
        raise Rejected("bad_config", "min_clients, local_epochs and batch_size must be >= 1")
    if out["compression"] < 1.0:
        raise Rejected("bad_config", "round config 'compression' must be >= 1")
    if out["residual_decay"] > 1.0:
        raise Rejected("bad_config", "round config 'residual_decay' must be in (0, 1]")
    if out["lr_final"] > 1.0:
        raise Rejected("bad_config", "round config 'lr_final' must be in (0, 1]")
    if out["secure_aggregation"] and out["min_clients"] < 2:
        raise Rejected("bad_config", "secure aggregation needs min_clients >= 2")
    if out["clients"] and out["clients"] < out["min_clients"]:
        raise Rejected("bad_config", "clients per round is below min_clients")
