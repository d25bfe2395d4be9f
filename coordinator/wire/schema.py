"""The public schema: service and method names, limits, identifiers, errors and messages.

Everything a site agent and a node must agree on, and nothing that does I/O. The typed
fleet messages (`Task`, `Submit`) are checked once, in `from_wire`, so the handlers
behind them meet only well-formed values; what depends on the open round (is this the
round, this stage, this site's turn) is for the round driver to judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FLEET_SERVICE = "fedraft.Fleet"
ADMIN_SERVICE = "fedraft.Admin"
FLEET_METHODS = ("Poll", "GetBlob", "Submit")
TRY_NEXT_NODE = frozenset({"unavailable", "disk_full"})
"""Refusal codes that mean "not this node, now": callers ask the next listed node."""
ADMIN_METHODS = (
    "Status", "Enroll", "Revoke", "Sites", "InitModel", "Train", "Stop",
    "RoundStatus", "GetBlob", "PutBlob", "AddNode", "RemoveNode", "TransferLeader",
    "AuditEntries",
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_UPDATE_ABS = 1.0e6
MAX_EXAMPLES = 1_000_000_000
SIGNATURE_WINDOW_S = 300.0
POLL_WAIT_MAX_S = 10.0
MAX_NESTING = 32
"""Deepest nesting of maps and lists a message may have (ours go about 6 deep)."""
MAX_METRICS = 64

SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A site id: what enrollment accepts, what certificates name and what a site.toml holds."""
HEX64 = re.compile(r"^[0-9a-f]{64}$")
"""A sha256 digest or an Ed25519 public key, in lowercase hex."""
HEX64_CHARS = frozenset("0123456789abcdef")

PLAIN_STAGES = ("collect",)
SECURE_STAGES = ("advertise", "share", "masked", "unmask")
EVAL_STAGE = "evaluate"
"""Not a round's stage: a run's final model, sent to sites that report their evaluation."""
STAGES = (*PLAIN_STAGES, *SECURE_STAGES, EVAL_STAGE)
"""Stages as sites see them: `collect` without secure aggregation, else SecAgg+'s; and the
final evaluation of a run."""


# ---------------------------------------------------------------- errors


class CodedError(ValueError):
    """The one error root of the coordinator: a stable `code` for the reply and a message.

    The state machine's rejections, wire errors and membership errors are all coded
    errors, so every boundary turns any of them into the same `{ok, code, error}` reply.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def reply(self, **extra: Any) -> dict[str, Any]:
        return error(self.code, self.message, **extra)


class WireError(CodedError):
    """A message that does not fit the schema."""


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The reply of a refused call."""
    return {"ok": False, "code": code, "error": message, **extra}


# ---------------------------------------------------------------- field checks


def is_int(value: Any) -> bool:
    """An int that is not a bool (msgpack and JSON both tell them apart)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def site_id(value: Any, what: str = "site id") -> str:
    if not isinstance(value, str) or not SITE_ID.fullmatch(value):
        raise WireError("malformed", f"bad {what} {value!r}")
    return value


def hex64(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise WireError("malformed", f"{what} must be 64 lowercase hex characters")
    return value


def check_metrics(value: Any) -> dict[str, float]:
    """A small map of metric names to finite numbers, as floats."""
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise WireError("malformed", "metrics must be a small map of names to numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            raise WireError("malformed", f"metric {k!r} must be a number")
        if not math.isfinite(v):
            raise WireError("malformed", f"metric {k!r} is not finite")
        out[k] = float(v)
    return out


_MAX_METRIC_ABS = 1.0e9
_METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def check_site_metrics(value: Any) -> dict[str, float]:
    """A site's self-reported metrics, range-checked before any of them reaches a commit
    (and so the signed audit log): names are short identifiers, every value lies within
    +-1e9, an accuracy within [0, 1] and a loss is not negative. The state machine keeps
    the looser `check_metrics`, so journals written before this check replay unchanged."""
    out = check_metrics(value)
    for name, v in out.items():
        if not _METRIC_NAME.fullmatch(name):
            raise WireError("out_of_range", f"metric name {name[:80]!r} is not a short identifier")
        if abs(v) > _MAX_METRIC_ABS:
            raise WireError("out_of_range", f"metric {name!r} is {v:.6g}, beyond +-{_MAX_METRIC_ABS:g}")
        if "accuracy" in name and not 0.0 <= v <= 1.0:
            raise WireError("out_of_range", f"metric {name!r} is {v:.6g}; an accuracy lies in [0, 1]")
        if "loss" in name and v < 0:
            raise WireError("out_of_range", f"metric {name!r} is {v:.6g}; a loss is not negative")
    return out


def _field(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = raw.get(key)
    if kind is int and not is_int(value) or not isinstance(value, kind):
        raise WireError("malformed", f"{what} needs {key!r} of type "
                        f"{getattr(kind, '__name__', 'number')}")
    return value


def _hex(value: str, what: str) -> str:
    try:
        bytes.fromhex(value)
    except ValueError:
        raise WireError("malformed", f"{what} must be hex") from None
    return value


def _count(raw: Mapping[str, Any], key: str, what: str) -> int:
    value = _field(raw, key, int, what)
    if value < 0:
        raise WireError("malformed", f"{what} field {key!r} must be >= 0")
    return value


# ---------------------------------------------------------------- fleet messages


TASK_CONFIG_KEYS = ("local_epochs", "lr", "batch_size", "secure_aggregation", "compression",
                    "error_feedback", "clip", "max_examples", "threshold", "residual_decay")
"""The round configuration keys a site sees in its task (the rest is the leader's)."""


@dataclass(frozen=True)
class TaskConfig:
    """What a site needs of the round configuration: local training and the update plan."""

    local_epochs: int
    lr: float
    batch_size: int
    secure_aggregation: bool
    compression: float
    error_feedback: bool
    clip: float
    max_examples: float
    threshold: int
    residual_decay: float = 1.0

    def to_wire(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TASK_CONFIG_KEYS}

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> TaskConfig:
        """The site's view of a (validated) round configuration, or of a task's config."""
        if not isinstance(raw, Mapping):
            raise WireError("malformed", "task config must be a map")
        out: dict[str, Any] = {}
        for key in TASK_CONFIG_KEYS:
            value = raw.get(key, 1.0 if key == "residual_decay" else None)
            kind = cls.__dataclass_fields__[key].type
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = is_int(value) and value >= 0
            else:
                ok = is_number(value) and value > 0
                value = float(value) if ok else value
            if not ok:
                raise WireError("malformed", f"task config {key!r} is missing or not a {kind}")
            out[key] = value
        return cls(**out)

    def training(self, round_number: int) -> dict[str, Any]:
        """The config a local trainer gets: epochs, lr, batch size and the round."""
        return {"local_epochs": self.local_epochs, "lr": self.lr,
                "batch_size": self.batch_size, "round": round_number}


@dataclass(frozen=True)
class Task:
    """The leader's answer to a sampled site's Poll: one stage of one round attempt.

    `payload` is the stage's own part: the SecAgg+ key directory (`share`) or the
    server's request (`masked`, `unmask`); empty otherwise.
    """

    federation: str
    round: int
    attempt: int
    term: int
    base: str
    parent: str | None
    seed: str
    participants: tuple[str, ...]
    stage: str
    deadline_s: float
    config: TaskConfig
    identity_keys: Mapping[str, str] = field(default_factory=dict)
    payload: Mapping[str, Any] = field(default_factory=dict)

    @property
    def session(self) -> str:
        """`round.attempt.term`: the secure-aggregation session this task belongs to."""
        return f"{self.round}.{self.attempt}.{self.term}"

    def to_wire(self) -> dict[str, Any]:
        return {
            "federation": self.federation, "round": self.round, "attempt": self.attempt,
            "term": self.term, "base": self.base, "parent": self.parent, "seed": self.seed,
            "participants": list(self.participants), "stage": self.stage,
            "deadline_s": self.deadline_s, "config": self.config.to_wire(),
            "identity_keys": dict(self.identity_keys), **self.payload,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Task:
        if not isinstance(raw, dict):
            raise WireError("malformed", "a task must be a map")
        what = "task"
        stage = _field(raw, "stage", str, what)
        if stage not in STAGES:
            raise WireError("malformed", f"unknown stage {stage!r}")
        parent = raw.get("parent")
        participants = _field(raw, "participants", list, what)
        keys = raw.get("identity_keys") or {}
        if not isinstance(keys, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise WireError("malformed", "task identity_keys must map sites to hex keys")
        deadline = raw.get("deadline_s", 30.0)
        return cls(
            federation=_field(raw, "federation", str, what),
            round=_count(raw, "round", what), attempt=_count(raw, "attempt", what),
            term=_count(raw, "term", what),
            base=hex64(raw.get("base"), "task base"),
            parent=None if parent is None else hex64(parent, "task parent"),
            seed=_hex(_field(raw, "seed", str, what), "task seed"),
            participants=tuple(site_id(p, "participant") for p in participants),
            stage=stage,
            deadline_s=float(deadline) if is_number(deadline) else 30.0,
            config=TaskConfig.from_mapping(raw.get("config")),
            identity_keys=dict(keys),
            payload={k: raw[k] for k in ("directory", "request") if isinstance(raw.get(k), dict)},
        )


@dataclass(frozen=True)
class Submit:
    """A site's answer to one stage: its update (`collect`) or its SecAgg+ message.

    Checked once here: the session it names, the stage, the metrics, and the type of
    every body field. The update's length and range depend on the round's plan, so the
    aggregation checks those when it decodes it.
    """

    site: str
    round: int
    attempt: int
    term: int
    stage: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    update: bytes | None = None
    num_examples: int | None = None
    secagg: Mapping[str, Any] | None = None
    declined: str | None = None  # the site takes no part in the attempt, and says why

    @property
    def session(self) -> tuple[int, int, int]:
        return (self.round, self.attempt, self.term)

    def to_wire(self) -> dict[str, Any]:
        """The body a site signs and sends (without `site`, `ts` and `sig`, added then)."""
        out: dict[str, Any] = {"round": self.round, "attempt": self.attempt, "term": self.term,
                               "stage": self.stage}
        if self.metrics:
            out["metrics"] = dict(self.metrics)
        if self.update is not None:
            out["update"] = self.update
            out["num_examples"] = self.num_examples
        if self.secagg is not None:
            out["secagg"] = dict(self.secagg)
        if self.declined is not None:
            out["declined"] = self.declined
        return out

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Submit:
        """Check the fields a Submit may carry. Which body a stage needs (an update or a
        SecAgg+ message) depends on the round's kind, so the aggregation asks for it."""
        site = site_id(raw.get("site"))
        rnd, attempt, term = (raw.get(k) for k in ("round", "attempt", "term"))
        stage = raw.get("stage")
        if not all(is_int(v) and v >= 0 for v in (rnd, attempt, term)):
            raise WireError("stale_round", f"round {rnd}.{attempt} (term {term}) is not open")
        if stage not in STAGES:
            raise WireError("wrong_stage", f"no stage {stage!r}")
        metrics = check_site_metrics(raw.get("metrics", {}))
        update, n, body = raw.get("update"), raw.get("num_examples"), raw.get("secagg")
        if update is not None and not isinstance(update, bytes):
            raise WireError("malformed", "update must be bytes")
        if n is not None and not (is_int(n) and 0 < n <= MAX_EXAMPLES):
            raise WireError("malformed", "num_examples must be a positive integer")
        if body is not None and not isinstance(body, dict):
            raise WireError("malformed", "a secure-aggregation message must be a map")
        declined = raw.get("declined")
        if declined is not None and not (isinstance(declined, str) and 0 < len(declined) <= 200):
            raise WireError("malformed", "declined must be a reason of at most 200 characters")
        return cls(site, rnd, attempt, term, stage, metrics, update=update, num_examples=n,
                   secagg=body, declined=declined)


# ---------------------------------------------------------------- unsettled DP runs

MAX_UNSETTLED = 20
"""How many DP runs (its newest) a site reports per Poll or Submit until the ledger settles them."""
UNSETTLED_DP = ("noise_multiplier", "sample_rate", "steps", "clip_norm", "delta")
LEDGER_SETTLED = ("charged", "uncharged", "invalid")
"""Answers in a reply's `ledger` list that settle a run: the site forgets it. Runs still
open or unknown are not answered and stay unsettled."""


def unsettled_run(entry: Any) -> dict[str, Any] | None:
    """A site's report of one DP run it was charged for by its own accountant:
    {round, attempt, term, noise_multiplier, sample_rate, steps, clip_norm, delta}.
    None when it does not fit (the leader answers `invalid` if it names an attempt)."""
    if not isinstance(entry, dict):
        return None
    ints = [entry.get(k) for k in ("round", "attempt", "term")]
    if any(not is_int(v) or v < 0 for v in ints):
        return None
    dp = [entry.get(k) for k in UNSETTLED_DP]
    if not all(is_number(v) for v in dp):
        return None
    sigma, q, steps, clip, delta = (float(v) for v in dp)  # type: ignore[arg-type]
    if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and steps == int(steps) and clip > 0
            and 0 < delta < 1):
        return None
    return {"round": ints[0], "attempt": ints[1], "term": ints[2], "noise_multiplier": sigma,
            "sample_rate": q, "steps": steps, "clip_norm": clip, "delta": delta}


# ---------------------------------------------------------------- enrollment bundles

BUNDLE_FORMAT = "fedraft-site-bundle"
BUNDLE_VERSION = 1
"""The enrollment bundle an operator sends a site (`fedraft client enroll --bundle`): one
JSON document, checked field by field on import (`fedraft-client import`)."""
BUNDLE_FIELDS: dict[str, type] = {
    "format": str, "version": int, "site": str, "public_key": str, "nodes": list,
    "ca_pem": str, "cert_pem": str, "key_pem": str, "budget": dict, "created": str}
