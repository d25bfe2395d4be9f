"""The SecAgg+ error hierarchy.

Every error is a `SecAggError`. `InvalidMessage` (also a ValueError) and its subclasses
mean one message was refused and the receiver's state is unchanged; `StageError` is a
call out of protocol order; `ProtocolAbort` means the session cannot finish.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- errors


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class InvalidMessage(SecAggError, ValueError):
    """A message was rejected; the receiver's state is unchanged."""


class UnknownParticipant(InvalidMessage):
    """The sender is not a participant, or not expected at this stage."""


class DuplicateMessage(InvalidMessage):
    """A second message from the same sender in one stage."""


class WrongContext(InvalidMessage):
    """The message belongs to another session (round, attempt or term): a replay."""


class BadSignature(InvalidMessage):
    """An advertisement is unsigned, forged, or its signer is not enrolled."""


class StageError(SecAggError):
    """A call out of protocol order."""


class ProtocolAbort(SecAggError):
    """The session cannot finish: too few survivors or too few shares for a secret."""
