"""Field checks shared by the state machine's operations.

A command that fails a check raises `Rejected` (a `wire.CodedError`) before the first
mutation, so `apply` turns it into an error result and the state is as it was.
Identifiers, digests and metrics are checked by the wire schema's own checks, so a
site id means the same thing to the state machine as on the wire.
"""

from __future__ import annotations

from typing import Any

from coordinator import wire
from coordinator.core.queries import quorum

Command = dict[str, Any]


REASON_CHARS = 200
"""The longest reason (an abort's, a quarantine's) the state machine records."""


class Rejected(wire.CodedError):
    """A command that fails validation; becomes an error result, never a state change."""


def need(cmd: Command, key: str, kind: type | tuple[type, ...]) -> Any:
    """`cmd[key]`, which must be present and of `kind` (an int is never a bool)."""
    if key not in cmd:
        raise Rejected("malformed", f"missing field {key!r}")
    value = cmd[key]
    if kind is int and isinstance(value, bool):
        raise Rejected("malformed", f"field {key!r} must be an integer")
    if not isinstance(value, kind):
        raise Rejected("malformed", f"field {key!r} has the wrong type")
    return value


def operator_name(cmd: Command) -> str | None:
    """The operator's certificate name a command may carry, for the audit log."""
    operator = cmd.get("operator")
    if operator is not None and not (isinstance(operator, str) and len(operator) <= 128):
        raise Rejected("malformed", "operator must be a name of at most 128 characters")
    return operator


def holders_quorum(cmd: dict[str, Any]) -> list[str]:
    """The nodes a command says hold a model blob, which must be a quorum of the cluster."""
    holders = need(cmd, "holders", list)
    if not all(isinstance(h, str) for h in holders):  # node ids; sorted and hashed below
        raise Rejected("malformed", "holders must be node ids")
    size = need(cmd, "cluster_size", int)
    if size < 1 or len(set(holders)) < quorum(size):
        raise Rejected("no_quorum", f"blob held by {len(set(holders))} of {size} nodes")
    return sorted(set(holders))
