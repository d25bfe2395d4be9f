"""The SecAgg+ messages, the session outcome and the checks both sides apply to them.

The client and the server exchange the message dataclasses below over any transport:
`to_wire()` gives plain str/bytes/int/list/dict values for msgpack; `from_wire()` checks
types and raises InvalidMessage on anything else. `verify_advertisement` checks an
advert's signature against the site's enrolled identity key; `Stage` is where a client or
server is in the protocol and `AggregateResult` what a finished session returns.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy import shamir
from privacy.secagg.errors import BadSignature, InvalidMessage, WrongContext
from privacy.secagg.params import _SIG_BYTES, SecAggParams, _advert_transcript

# --------------------------------------------------------------------------- messages


def _w_get(d: Mapping[str, Any], key: str) -> Any:
    """A message's field; a message that is not a map is refused like any bad field."""
    if not isinstance(d, Mapping):
        raise InvalidMessage(f"message must be a map, not {type(d).__name__}")
    return d.get(key)


def _w_bytes(d: Mapping[str, Any], key: str) -> bytes:
    v = _w_get(d, key)
    if not isinstance(v, bytes | bytearray):
        raise InvalidMessage(f"field {key!r} must be bytes")
    return bytes(v)


def _w_str(d: Mapping[str, Any], key: str) -> str:
    v = _w_get(d, key)
    if not isinstance(v, str):
        raise InvalidMessage(f"field {key!r} must be a string")
    return v


def _w_ids(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = _w_get(d, key)
    if not isinstance(v, list | tuple) or any(not isinstance(x, str) for x in v):
        raise InvalidMessage(f"field {key!r} must be a list of strings")
    return tuple(v)


def _w_bytes_map(d: Mapping[str, Any], key: str) -> Mapping[str, bytes]:
    v = _w_get(d, key)
    if not isinstance(v, Mapping) or any(
        not isinstance(k, str) or not isinstance(x, bytes | bytearray) for k, x in v.items()
    ):
        raise InvalidMessage(f"field {key!r} must map strings to bytes")
    return MappingProxyType({k: bytes(x) for k, x in v.items()})


@dataclass(frozen=True)
class Advertisement:
    """Stage 0, client -> server -> neighbours: the client's two session public keys.

    c_public encrypts shares sent to this client; s_public derives pairwise masks. The
    signature (Ed25519, the site's enrolled identity key) covers context, session id,
    client id and both keys, so a forged, unsigned or replayed advert is refused.
    """

    context: bytes
    client_id: str
    c_public: bytes
    s_public: bytes
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {
            "context": self.context,
            "client_id": self.client_id,
            "c_public": self.c_public,
            "s_public": self.s_public,
            "signature": self.signature,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Advertisement:
        """Parse and type-check `to_wire` output."""
        return cls(
            context=_w_bytes(d, "context"),
            client_id=_w_str(d, "client_id"),
            c_public=_w_bytes(d, "c_public"),
            s_public=_w_bytes(d, "s_public"),
            signature=_w_bytes(d, "signature"),
        )


@dataclass(frozen=True)
class KeyDirectory:
    """After stage 0, server -> each advertised client: its neighbours' advertisements."""

    context: bytes
    recipient: str
    adverts: tuple[Advertisement, ...]

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {
            "context": self.context,
            "recipient": self.recipient,
            "adverts": [a.to_wire() for a in self.adverts],
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> KeyDirectory:
        """Parse and type-check `to_wire` output."""
        adverts = _w_get(d, "adverts")
        if not isinstance(adverts, list | tuple) or any(
            not isinstance(a, Mapping) for a in adverts
        ):
            raise InvalidMessage("field 'adverts' must be a list of adverts")
        return cls(
            context=_w_bytes(d, "context"),
            recipient=_w_str(d, "recipient"),
            adverts=tuple(Advertisement.from_wire(a) for a in adverts),
        )


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 1, client -> server: one AES-GCM ciphertext per advertised neighbour."""

    context: bytes
    sender: str
    ciphertexts: Mapping[str, bytes]  # receiver id -> nonce || ciphertext

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {"context": self.context, "sender": self.sender, "ciphertexts": dict(self.ciphertexts)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> EncryptedShares:
        """Parse and type-check `to_wire` output."""
        return cls(
            context=_w_bytes(d, "context"),
            sender=_w_str(d, "sender"),
            ciphertexts=_w_bytes_map(d, "ciphertexts"),
        )


@dataclass(frozen=True)
class MaskedInputRequest:
    """After stage 1, server -> each client in U1: U1 and the ciphertexts addressed to it."""

    context: bytes
    recipient: str
    survivors: tuple[str, ...]  # U1: clients whose shares were collected
    ciphertexts: Mapping[str, bytes]  # sender id -> ciphertext for recipient

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {
            "context": self.context,
            "recipient": self.recipient,
            "survivors": list(self.survivors),
            "ciphertexts": dict(self.ciphertexts),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> MaskedInputRequest:
        """Parse and type-check `to_wire` output."""
        return cls(
            context=_w_bytes(d, "context"),
            recipient=_w_str(d, "recipient"),
            survivors=_w_ids(d, "survivors"),
            ciphertexts=_w_bytes_map(d, "ciphertexts"),
        )


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client -> server: the masked uint32 vector y_u."""

    context: bytes
    sender: str
    vector: np.ndarray = field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form; the vector travels as little-endian uint32 bytes."""
        v = np.asarray(self.vector)
        return {
            "context": self.context,
            "sender": self.sender,
            "vector": v.astype("<u4", copy=False).tobytes(),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> MaskedInput:
        """Parse and type-check `to_wire` output (length is checked by the server)."""
        raw = _w_bytes(d, "vector")
        if len(raw) % 4:
            raise InvalidMessage("vector bytes are not a whole number of uint32 words")
        vec = np.frombuffer(raw, dtype="<u4").astype(np.uint32, copy=False)
        return cls(context=_w_bytes(d, "context"), sender=_w_str(d, "sender"), vector=vec)


@dataclass(frozen=True)
class UnmaskRequest:
    """After stage 2, server -> every client in U2: who survived and who dropped."""

    context: bytes
    survivors: tuple[str, ...]  # U2: clients whose masked input is in the sum
    dropped: tuple[str, ...]  # D = U1 \ U2: masked keys shared, no masked input

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {
            "context": self.context,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> UnmaskRequest:
        """Parse and type-check `to_wire` output."""
        return cls(
            context=_w_bytes(d, "context"),
            survivors=_w_ids(d, "survivors"),
            dropped=_w_ids(d, "dropped"),
        )


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, client -> server: shares of b_v for surviving and s_v for dropped neighbours."""

    context: bytes
    sender: str
    self_mask_shares: Mapping[str, bytes]  # owner in U2 -> share of b_owner
    key_shares: Mapping[str, bytes]  # owner in D -> share of s_owner

    def to_wire(self) -> dict[str, Any]:
        """Plain-value form for serialisation."""
        return {
            "context": self.context,
            "sender": self.sender,
            "self_mask_shares": dict(self.self_mask_shares),
            "key_shares": dict(self.key_shares),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> UnmaskResponse:
        """Parse and type-check `to_wire` output."""
        return cls(
            context=_w_bytes(d, "context"),
            sender=_w_str(d, "sender"),
            self_mask_shares=_w_bytes_map(d, "self_mask_shares"),
            key_shares=_w_bytes_map(d, "key_shares"),
        )


@dataclass(frozen=True)
class AggregateResult:
    """The session's outcome: the exact sum mod 2^32 of the survivors' inputs."""

    total: np.ndarray = field(repr=False)  # uint32, length vector_len
    survivors: tuple[str, ...]  # U2: exactly the clients whose inputs are in total
    dropped: tuple[str, ...]  # U1 \ U2
    responders: tuple[str, ...]  # U3: clients that returned unmask shares


class Stage(enum.Enum):
    """Where a client or server is in the protocol."""

    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


def verify_advertisement(
    params: SecAggParams,
    advert: Advertisement,
    identity_keys: Mapping[str, Ed25519PublicKey | bytes],
) -> None:
    """Check an advert's sender, context, key sizes and identity signature; raise if bad."""
    if not isinstance(advert, Advertisement):
        raise InvalidMessage("not an Advertisement")
    params.check_participant(advert.client_id)
    if advert.context != params.context:
        raise WrongContext(f"advert of {advert.client_id!r} is for another session")
    if len(advert.c_public) != 32 or len(advert.s_public) != 32:
        raise InvalidMessage("X25519 public keys are 32 bytes")
    if advert.c_public == advert.s_public:
        raise InvalidMessage("the two session keys must differ")
    identity = identity_keys.get(advert.client_id)
    if isinstance(identity, bytes | bytearray) and len(identity) == 32:
        identity = Ed25519PublicKey.from_public_bytes(bytes(identity))
    if not isinstance(identity, Ed25519PublicKey):
        raise BadSignature(f"{advert.client_id!r} has no enrolled identity key")
    if len(advert.signature) != _SIG_BYTES:
        raise BadSignature(f"advert of {advert.client_id!r} is unsigned or malformed")
    transcript = _advert_transcript(params, advert.client_id, advert.c_public, advert.s_public)
    try:
        identity.verify(advert.signature, transcript)
    except InvalidSignature as exc:
        raise BadSignature(f"bad signature on the advert of {advert.client_id!r}") from exc


def _check_context(params: SecAggParams, context: bytes) -> None:
    if context != params.context:
        raise WrongContext("message is for another session")


def _parse_share(params: SecAggParams, raw: bytes, holder: str) -> shamir.Share:
    try:
        share = shamir.Share.from_bytes(raw)
    except shamir.ShamirError as exc:
        raise InvalidMessage(f"malformed share from {holder!r}") from exc
    if share.threshold != params.threshold or share.x != params.x_coordinate[holder]:
        raise InvalidMessage(f"share from {holder!r} has the wrong x or threshold")
    return share
