"""SecAgg+ (Bell et al., CCS 2020) as transport-free, message-driven state objects.

The coordinator holds one `SecAggServer` per session and each site one `SecAggClient`;
they exchange the message dataclasses below over any transport (`to_wire()` gives plain
str/bytes/int/list/dict values for msgpack; `from_wire()` checks types). Nothing here does
I/O, reads a clock or draws randomness except through the `rng` callable passed in.

Four round trips (U0 ⊇ U1 ⊇ U2 ⊇ U3 are the clients still responding after each):

0. advertise     client -> server  Advertisement (two X25519 public keys, signed with the
                                   site's enrolled Ed25519 identity key, bound to context)
                 server -> client  KeyDirectory (the advertisements of its neighbours)
1. share keys    client -> server  EncryptedShares (Shamir shares of the self-mask seed b_u
                                   and of the masking key s_u, AES-GCM per neighbour)
                 server -> client  MaskedInputRequest (U1 and the ciphertexts addressed to it)
2. masked input  client -> server  MaskedInput  y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv)
                 server -> client  UnmaskRequest (U2 and D = U1 \\ U2), the same for all
3. unmask        client -> server  UnmaskResponse (b shares of survivors, s shares of D)
                 server            finish() -> exact sum mod 2^32 of the U2 inputs

Security notes. Each client only masks with neighbours in a sparse graph derived from a
public seed (degree about 2 log2 n). The threshold must exceed half the degree; a client
masks only if at least t neighbours are in U1, answers one unmask request only and never
reveals both b_v and s_v for one v, so no single answer set yields t shares of both of one
client's secrets. All key derivations and ciphertexts are bound to a session id that
hashes the context (federation, round, attempt, term) and every public parameter, so
nothing carries over between rounds or attempts.

Threat model: a coordinator that follows the protocol but tries to learn individual
inputs from what it sees (and cannot substitute keys: adverts are signed with enrolled
identity keys), plus any number of dropouts. A coordinator that actively sends
*different* survivor/dropped views to different clients is not covered by these four
round trips: that needs the extra consistency-check round of Bonawitz et al. (2017, §4)
in which clients sign the U2 they were shown and only unmask after seeing t matching
signatures. `UnmaskRequest` is built to be the same message for every client so that
round can be added without changing the others.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy import shamir
from privacy.prg import apply_masks

MaskApplier = Callable[[np.ndarray, Sequence[bytes], Sequence[bytes]], None]
"""Adds the PRG masks of the first keys to a uint32 vector and subtracts the second's."""

Rng = Callable[[int], bytes]
"""An os.urandom-like callable: n -> n random bytes."""

MASK_KEY_BYTES = 16
"""AES-128 keys for the mask generator (128 bits)."""
SEED_BYTES = 32
"""Length of the self-mask seed b_u."""
MAX_ID_BYTES = 256
_KEY_BYTES = 32
_NONCE_BYTES = 12
_SIG_BYTES = 64
_MAX_CIPHERTEXT = 2048

_DOMAIN = b"fedraft/secagg+/v1/"
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


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


# --------------------------------------------------------------------------- helpers


def _lp(*parts: bytes) -> bytes:
    """Unambiguous concatenation: each part prefixed by its 4-byte length."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _id_bytes(client_id: str) -> bytes:
    return client_id.encode("utf-8")


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def make_context(federation_id: str, round_number: int, attempt: int, term: int) -> bytes:
    """Canonical session context: binds federation, round, attempt and leader term."""
    for name, value in (("round_number", round_number), ("attempt", attempt), ("term", term)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
            raise ValueError(f"{name} must be a non-negative int")
    return _DOMAIN + b"context" + _lp(
        federation_id.encode("utf-8"),
        round_number.to_bytes(8, "big"),
        attempt.to_bytes(8, "big"),
        term.to_bytes(8, "big"),
    )


def default_degree(n: int) -> int:
    """Neighbour-graph degree for n clients: 2 * ceil(log2 n), capped at n - 1."""
    if n < 2:
        raise ValueError("need at least two participants")
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(degree: int) -> int:
    """Smallest secure threshold for a degree: floor(degree / 2) + 1."""
    return degree // 2 + 1


def pairwise_sign(u: str, v: str) -> int:
    """+1 if u adds PRG(s_uv), -1 if it subtracts (the pair's two masks cancel)."""
    return 1 if u < v else -1


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters every party of one session agrees on (from `round_open`).

    participants are canonicalised to a sorted tuple; a client's Shamir x coordinate is
    its position there plus one. degree None picks `default_degree`. The threshold must
    satisfy degree / 2 < threshold <= degree (Bell et al.'s condition against a server
    that lies about dropouts).
    """

    context: bytes
    participants: tuple[str, ...]
    vector_len: int
    threshold: int
    graph_seed: bytes
    degree: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, bytes) or not self.context:
            raise ValueError("context must be non-empty bytes")
        if not isinstance(self.graph_seed, bytes):
            raise ValueError("graph_seed must be bytes")
        ids = list(self.participants)
        if any(not isinstance(p, str) or not p for p in ids):
            raise ValueError("participant ids must be non-empty strings")
        if any(len(_id_bytes(p)) > MAX_ID_BYTES for p in ids):
            raise ValueError(f"participant ids are at most {MAX_ID_BYTES} bytes")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate participant ids")
        n = len(ids)
        if n < 2:
            raise ValueError("need at least two participants")
        object.__setattr__(self, "participants", tuple(sorted(ids)))
        if isinstance(self.vector_len, bool) or not isinstance(self.vector_len, int):
            raise ValueError("vector_len must be an int")
        if self.vector_len < 1:
            raise ValueError("vector_len must be positive")
        degree = default_degree(n) if self.degree is None else self.degree
        if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree < n:
            raise ValueError(f"degree must be in [1, {n - 1}]")
        if degree < n - 1 and degree % 2:
            raise ValueError("degree must be even unless the graph is complete (n - 1)")
        object.__setattr__(self, "degree", degree)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int) or not degree // 2 < t <= degree:
            raise ValueError(
                f"threshold must satisfy degree/2 < threshold <= degree "
                f"(degree {degree}), got {t}"
            )

    @property
    def n(self) -> int:
        """Number of participants."""
        return len(self.participants)

    @cached_property
    def session_id(self) -> bytes:
        """Hash of every public parameter; all derivations and signatures bind it."""
        return hashlib.sha256(
            _DOMAIN
            + b"session"
            + _lp(
                self.context,
                _lp(*(_id_bytes(p) for p in self.participants)),
                self.vector_len.to_bytes(8, "big"),
                self.threshold.to_bytes(4, "big"),
                int(self.degree or 0).to_bytes(4, "big"),
                self.graph_seed,
            )
        ).digest()

    @cached_property
    def x_coordinate(self) -> Mapping[str, int]:
        """Shamir x coordinate of the share each participant holds."""
        return MappingProxyType({p: i + 1 for i, p in enumerate(self.participants)})

    @cached_property
    def neighbours(self) -> Mapping[str, frozenset[str]]:
        """The public neighbour graph: a ring (Harary graph) over a seeded permutation.

        Every client is joined to degree/2 clients on each side in an order given by
        hashing (graph_seed, context, id), so each party computes the same graph.
        """
        order = sorted(
            self.participants,
            key=lambda p: hashlib.sha256(
                _DOMAIN + b"graph" + _lp(self.graph_seed, self.context, _id_bytes(p))
            ).digest(),
        )
        n = len(order)
        degree = int(self.degree or 0)
        if degree == n - 1:
            graph = {p: frozenset(q for q in order if q != p) for p in order}
        else:
            half = degree // 2
            graph = {
                p: frozenset(
                    order[(i + j) % n] for j in range(-half, half + 1) if j != 0
                )
                for i, p in enumerate(order)
            }
        return MappingProxyType(graph)

    def check_participant(self, client_id: str) -> None:
        """Raise UnknownParticipant unless client_id takes part in this session."""
        if not isinstance(client_id, str) or client_id not in self.x_coordinate:
            raise UnknownParticipant(f"{client_id!r} is not a participant of this session")


def _pairwise_key(params: SecAggParams, shared: bytes, u: str, v: str) -> bytes:
    a, b = sorted((u, v))
    info = _DOMAIN + b"pairwise-mask" + _lp(params.session_id, _id_bytes(a), _id_bytes(b))
    return _hkdf(shared, info, MASK_KEY_BYTES)


def _self_mask_key(params: SecAggParams, seed: bytes, owner: str) -> bytes:
    info = _DOMAIN + b"self-mask" + _lp(params.session_id, _id_bytes(owner))
    return _hkdf(seed, info, MASK_KEY_BYTES)


def _share_key(params: SecAggParams, shared: bytes, sender: str, receiver: str) -> bytes:
    info = _DOMAIN + b"share-encryption" + _lp(
        params.session_id, _id_bytes(sender), _id_bytes(receiver)
    )
    return _hkdf(shared, info, _KEY_BYTES)


def _share_aad(params: SecAggParams, sender: str, receiver: str) -> bytes:
    return _DOMAIN + b"share-aad" + _lp(
        params.context, params.session_id, _id_bytes(sender), _id_bytes(receiver)
    )


def _advert_transcript(params: SecAggParams, client_id: str, c_pk: bytes, s_pk: bytes) -> bytes:
    return _DOMAIN + b"advertise" + _lp(
        params.context, params.session_id, _id_bytes(client_id), c_pk, s_pk
    )


def _x25519_public(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidMessage("malformed X25519 public key") from exc


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(_x25519_public(public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise InvalidMessage("X25519 key agreement failed (low-order public key)") from exc


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, _RAW_PUB)


def _normalise_identities(
    identity_keys: Mapping[str, Ed25519PublicKey | bytes],
) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for cid, key in identity_keys.items():
        if isinstance(key, Ed25519PublicKey):
            out[cid] = key
        elif isinstance(key, bytes | bytearray) and len(key) == 32:
            out[cid] = Ed25519PublicKey.from_public_bytes(bytes(key))
        else:
            raise ValueError(f"identity key of {cid!r} must be an Ed25519 public key")
    return out


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


# --------------------------------------------------------------------------- client


class SecAggClient:
    """One site's side of one session. Call the four stage methods in order.

    A method that raises InvalidMessage leaves the client where it was; ProtocolAbort
    means this client cannot continue in the session (the server counts it as dropped).
    """

    def __init__(
        self,
        params: SecAggParams,
        client_id: str,
        identity_key: Ed25519PrivateKey,
        identity_keys: Mapping[str, Ed25519PublicKey | bytes],
        rng: Rng,
    ) -> None:
        params.check_participant(client_id)
        self.params = params
        self.client_id = client_id
        self._identity = identity_key
        self._identities = _normalise_identities(identity_keys)
        self._rng = rng
        self.stage = Stage.ADVERTISE
        self._neighbours = params.neighbours[client_id]
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._peer_adverts: dict[str, Advertisement] = {}
        self._seed: bytes | None = None
        self._b_shares: dict[str, shamir.Share] = {}  # owner -> my share of b_owner
        self._s_shares: dict[str, shamir.Share] = {}  # owner -> my share of s_owner
        self._mask_peers: frozenset[str] = frozenset()
        self._u1: frozenset[str] = frozenset()

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise StageError(f"client is at {self.stage.value}, not {stage.value}")

    def advertise(self) -> Advertisement:
        """Stage 0: make this session's key pairs and sign their public halves."""
        self._expect(Stage.ADVERTISE)
        c_key = X25519PrivateKey.from_private_bytes(self._draw(32))
        s_key = X25519PrivateKey.from_private_bytes(self._draw(32))
        c_pub, s_pub = _public_bytes(c_key), _public_bytes(s_key)
        sig = self._identity.sign(_advert_transcript(self.params, self.client_id, c_pub, s_pub))
        self._c_key, self._s_key = c_key, s_key
        self.stage = Stage.SHARE_KEYS
        return Advertisement(self.params.context, self.client_id, c_pub, s_pub, sig)

    def share_keys(self, directory: KeyDirectory) -> EncryptedShares:
        """Stage 1: verify neighbours' adverts, then share b_u and s_u among them."""
        self._expect(Stage.SHARE_KEYS)
        p = self.params
        _check_context(p, directory.context)
        if directory.recipient != self.client_id:
            raise InvalidMessage("key directory addressed to another client")
        peers: dict[str, Advertisement] = {}
        for advert in directory.adverts:
            verify_advertisement(p, advert, self._identities)
            if advert.client_id not in self._neighbours:
                raise UnknownParticipant(f"{advert.client_id!r} is not a neighbour")
            if advert.client_id in peers:
                raise DuplicateMessage(f"two adverts of {advert.client_id!r}")
            peers[advert.client_id] = advert
        if len(peers) < p.threshold:
            raise ProtocolAbort(
                f"{len(peers)} neighbours advertised, threshold is {p.threshold}"
            )
        assert self._c_key is not None and self._s_key is not None
        seed = self._draw(SEED_BYTES)
        holders = sorted(peers)
        xs = [p.x_coordinate[v] for v in holders]
        s_raw = self._s_key.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)
        b_parts = shamir.split(seed, xs, p.threshold, self._rng)
        s_parts = shamir.split(s_raw, xs, p.threshold, self._rng)
        me = self.client_id
        ciphertexts: dict[str, bytes] = {}
        for v, b_sh, s_sh in zip(holders, b_parts, s_parts, strict=True):
            shared = _exchange(self._c_key, peers[v].c_public)
            key = _share_key(p, shared, me, v)
            nonce = self._draw(_NONCE_BYTES)
            plaintext = _lp(_id_bytes(me), _id_bytes(v), b_sh.to_bytes(), s_sh.to_bytes())
            ct = AESGCM(key).encrypt(nonce, plaintext, _share_aad(p, me, v))
            ciphertexts[v] = nonce + ct
        self._peer_adverts = peers
        self._seed = seed
        self.stage = Stage.MASKED_INPUT
        return EncryptedShares(p.context, me, MappingProxyType(ciphertexts))

    def masked_input(self, request: MaskedInputRequest, x: np.ndarray) -> MaskedInput:
        """Stage 2: store neighbours' shares and return y_u = x_u + masks (mod 2^32).

        Masks with exactly the neighbours in U1 (the server's view after stage 1), so
        pairs where one side dropped before this stage never enter the sum.
        """
        self._expect(Stage.MASKED_INPUT)
        p = self.params
        me = self.client_id
        _check_context(p, request.context)
        if request.recipient != me:
            raise InvalidMessage("masked-input request addressed to another client")
        u1 = frozenset(request.survivors)
        if len(u1) != len(request.survivors):
            raise InvalidMessage("duplicate ids in U1")
        for cid in u1:
            p.check_participant(cid)
        if me not in u1:
            raise InvalidMessage("this client is not in U1")
        if len(u1) < p.threshold:
            raise ProtocolAbort(f"|U1| = {len(u1)} is below the threshold {p.threshold}")
        peers = frozenset(v for v in self._neighbours if v in u1)
        if not peers <= self._peer_adverts.keys():
            raise InvalidMessage("U1 names a neighbour that never advertised")
        if set(request.ciphertexts) != peers:
            raise InvalidMessage("ciphertexts do not match the neighbours in U1")
        if len(peers) < p.threshold:
            # Too few pairwise masks: the self mask alone would be revealed at unmask.
            raise ProtocolAbort(
                f"{len(peers)} neighbours in U1, threshold is {p.threshold}; not masking"
            )
        if not isinstance(x, np.ndarray) or x.dtype != np.uint32 or x.shape != (p.vector_len,):
            raise ValueError(f"input must be a uint32 array of shape ({p.vector_len},)")
        assert self._c_key is not None and self._s_key is not None and self._seed is not None
        b_shares: dict[str, shamir.Share] = {}
        s_shares: dict[str, shamir.Share] = {}
        for v in sorted(peers):
            b_shares[v], s_shares[v] = self._open(v, request.ciphertexts[v])
        add, subtract = [_self_mask_key(p, self._seed, me)], []
        for v in sorted(peers):
            shared = _exchange(self._s_key, self._peer_adverts[v].s_public)
            key = _pairwise_key(p, shared, me, v)
            (add if pairwise_sign(me, v) > 0 else subtract).append(key)
        y = x.copy()
        apply_masks(y, add, subtract)
        self._b_shares, self._s_shares = b_shares, s_shares
        self._mask_peers = peers
        self._u1 = u1
        self.stage = Stage.UNMASK
        return MaskedInput(p.context, me, y)

    def _open(self, sender: str, blob: bytes) -> tuple[shamir.Share, shamir.Share]:
        p = self.params
        me = self.client_id
        if len(blob) < _NONCE_BYTES + 16 or len(blob) > _MAX_CIPHERTEXT:
            raise InvalidMessage(f"ciphertext from {sender!r} has a bad length")
        assert self._c_key is not None
        shared = _exchange(self._c_key, self._peer_adverts[sender].c_public)
        key = _share_key(p, shared, sender, me)
        try:
            pt = AESGCM(key).decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _share_aad(p, sender, me)
            )
        except InvalidTag as exc:
            raise InvalidMessage(f"shares from {sender!r} fail authentication") from exc
        parts = _split_lp(pt)
        if len(parts) != 4 or parts[0] != _id_bytes(sender) or parts[1] != _id_bytes(me):
            raise InvalidMessage(f"shares from {sender!r} are malformed")
        return _parse_share(p, parts[2], me), _parse_share(p, parts[3], me)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: reveal b shares of surviving and s shares of dropped neighbours.

        Answered once per session; a neighbour named both survivor and dropped, or a
        survivor set that is not part of U1, is refused, so both secrets of one client
        never leave this client.
        """
        self._expect(Stage.UNMASK)
        p = self.params
        _check_context(p, request.context)
        u2 = frozenset(request.survivors)
        dropped = frozenset(request.dropped)
        if len(u2) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise InvalidMessage("duplicate ids in the unmask request")
        if u2 & dropped:
            raise InvalidMessage("a client is named both survivor and dropped; refusing")
        if (u2 | dropped) != self._u1:
            raise InvalidMessage("survivors and dropped must partition U1")
        if self.client_id not in u2:
            raise InvalidMessage("this client is not among the survivors")
        if len(u2) < p.threshold:
            raise ProtocolAbort(f"|U2| = {len(u2)} is below the threshold {p.threshold}")
        b_out = {v: self._b_shares[v].to_bytes() for v in sorted(self._mask_peers & u2)}
        s_out = {v: self._s_shares[v].to_bytes() for v in sorted(self._mask_peers & dropped)}
        self.stage = Stage.DONE
        # Nothing of this session is needed any more.
        self._b_shares, self._s_shares = {}, {}
        self._seed = None
        self._s_key = self._c_key = None
        return UnmaskResponse(
            p.context, self.client_id, MappingProxyType(b_out), MappingProxyType(s_out)
        )

    def _draw(self, n: int) -> bytes:
        out = self._rng(n)
        if not isinstance(out, bytes) or len(out) != n:
            raise ValueError("rng must return exactly n bytes")
        return out


def _split_lp(data: bytes) -> list[bytes]:
    parts: list[bytes] = []
    off = 0
    while off < len(data):
        if off + 4 > len(data):
            raise InvalidMessage("truncated length prefix")
        n = int.from_bytes(data[off : off + 4], "big")
        off += 4
        if off + n > len(data):
            raise InvalidMessage("truncated field")
        parts.append(data[off : off + n])
        off += n
    return parts


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The coordinator's side of one session: routes messages, sums, unmasks.

    receive_* methods validate a message completely before storing it (a rejected
    message changes nothing); close_* methods end a stage and return what to send next.
    Masked vectors are added into a running sum as they arrive, so the server never
    keeps a client's vector. `masker` removes the masks at the end (`apply_masks`'s
    signature); the coordinator passes one that spreads the work over processes.
    """

    def __init__(
        self, params: SecAggParams, identity_keys: Mapping[str, Ed25519PublicKey | bytes],
        masker: MaskApplier = apply_masks,
    ) -> None:
        self.params = params
        self._masker = masker
        self._identities = _normalise_identities(identity_keys)
        self.stage = Stage.ADVERTISE
        self._adverts: dict[str, Advertisement] = {}
        self._shares: dict[str, Mapping[str, bytes]] = {}
        self._u1: frozenset[str] = frozenset()
        self._u2: frozenset[str] = frozenset()
        self._sum: np.ndarray | None = None
        self._masked_from: set[str] = set()
        self._responses: dict[str, tuple[dict[str, shamir.Share], dict[str, shamir.Share]]] = {}

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise StageError(f"server is at {self.stage.value}, not {stage.value}")

    @property
    def advertised(self) -> frozenset[str]:
        """U0: clients whose advertisement was accepted."""
        return frozenset(self._adverts)

    # ---- stage 0

    def receive_advertisement(self, advert: Advertisement) -> None:
        """Accept one client's signed advertisement."""
        self._expect(Stage.ADVERTISE)
        verify_advertisement(self.params, advert, self._identities)
        if advert.client_id in self._adverts:
            raise DuplicateMessage(f"second advert from {advert.client_id!r}")
        self._adverts[advert.client_id] = advert

    def close_advertise(self) -> dict[str, KeyDirectory]:
        """End stage 0; returns the key directory to send to each client in U0."""
        self._expect(Stage.ADVERTISE)
        p = self.params
        u0 = self.advertised
        if len(u0) < p.threshold:
            raise ProtocolAbort(f"only {len(u0)} clients advertised, threshold {p.threshold}")
        out = {
            u: KeyDirectory(
                p.context,
                u,
                tuple(self._adverts[v] for v in sorted(p.neighbours[u] & u0)),
            )
            for u in sorted(u0)
        }
        self.stage = Stage.SHARE_KEYS
        return out

    # ---- stage 1

    def receive_shares(self, msg: EncryptedShares) -> None:
        """Accept one client's encrypted shares (one ciphertext per advertised neighbour)."""
        self._expect(Stage.SHARE_KEYS)
        p = self.params
        _check_context(p, msg.context)
        p.check_participant(msg.sender)
        if msg.sender not in self._adverts:
            raise UnknownParticipant(f"{msg.sender!r} did not advertise")
        if msg.sender in self._shares:
            raise DuplicateMessage(f"second share message from {msg.sender!r}")
        expected = p.neighbours[msg.sender] & self._adverts.keys()
        if set(msg.ciphertexts) != expected:
            raise InvalidMessage(f"{msg.sender!r} must send one ciphertext per neighbour")
        for ct in msg.ciphertexts.values():
            if not isinstance(ct, bytes) or not _NONCE_BYTES + 16 < len(ct) <= _MAX_CIPHERTEXT:
                raise InvalidMessage(f"ciphertext from {msg.sender!r} has a bad length")
        self._shares[msg.sender] = MappingProxyType(dict(msg.ciphertexts))

    def close_share_keys(self) -> dict[str, MaskedInputRequest]:
        """End stage 1; returns the masked-input request for each client in U1."""
        self._expect(Stage.SHARE_KEYS)
        p = self.params
        u1 = frozenset(self._shares)
        if len(u1) < p.threshold:
            raise ProtocolAbort(f"only {len(u1)} clients shared keys, threshold {p.threshold}")
        survivors = tuple(sorted(u1))
        out: dict[str, MaskedInputRequest] = {}
        for u in survivors:
            inbox = {v: self._shares[v][u] for v in sorted(p.neighbours[u] & u1)}
            out[u] = MaskedInputRequest(p.context, u, survivors, MappingProxyType(inbox))
        self._u1 = u1
        self._shares = {}
        self.stage = Stage.MASKED_INPUT
        return out

    # ---- stage 2

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Accept one masked vector and add it to the running sum."""
        self._expect(Stage.MASKED_INPUT)
        p = self.params
        _check_context(p, msg.context)
        p.check_participant(msg.sender)
        if msg.sender not in self._u1:
            raise UnknownParticipant(f"{msg.sender!r} is not in U1")
        if msg.sender in self._masked_from:
            raise DuplicateMessage(f"second masked input from {msg.sender!r}")
        v = msg.vector
        if not isinstance(v, np.ndarray) or v.dtype != np.uint32 or v.shape != (p.vector_len,):
            raise InvalidMessage(
                f"masked input must be uint32 of shape ({p.vector_len},), got "
                f"{getattr(v, 'dtype', type(v))} {getattr(v, 'shape', '')}"
            )
        if self._sum is None:
            # The running sum starts as a copy of the first vector: no zero-filled pass.
            self._sum = v.copy()
        else:
            np.add(self._sum, v, out=self._sum)
        self._masked_from.add(msg.sender)

    def close_masked_input(self) -> UnmaskRequest:
        """End stage 2; returns the unmask request to send to every client in U2."""
        self._expect(Stage.MASKED_INPUT)
        p = self.params
        u2 = frozenset(self._masked_from)
        if len(u2) < p.threshold:
            raise ProtocolAbort(f"only {len(u2)} masked inputs, threshold {p.threshold}")
        self._u2 = u2
        self.stage = Stage.UNMASK
        return UnmaskRequest(p.context, tuple(sorted(u2)), tuple(sorted(self._u1 - u2)))

    @property
    def unmask_recipients(self) -> tuple[str, ...]:
        """U2: the clients to send the unmask request to."""
        return tuple(sorted(self._u2))

    # ---- stage 3

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Accept one client's shares; they must be exactly the ones the server asked for."""
        self._expect(Stage.UNMASK)
        p = self.params
        _check_context(p, msg.context)
        p.check_participant(msg.sender)
        if msg.sender not in self._u2:
            raise UnknownParticipant(f"{msg.sender!r} is not in U2")
        if msg.sender in self._responses:
            raise DuplicateMessage(f"second unmask response from {msg.sender!r}")
        peers = p.neighbours[msg.sender] & self._u1
        if set(msg.self_mask_shares) != peers & self._u2:
            raise InvalidMessage(f"{msg.sender!r} sent the wrong set of self-mask shares")
        if set(msg.key_shares) != peers - self._u2:
            raise InvalidMessage(f"{msg.sender!r} sent the wrong set of key shares")
        b = {o: _parse_share(p, raw, msg.sender) for o, raw in msg.self_mask_shares.items()}
        s = {o: _parse_share(p, raw, msg.sender) for o, raw in msg.key_shares.items()}
        self._responses[msg.sender] = (b, s)

    def finish(self) -> AggregateResult:
        """End stage 3: reconstruct the needed secrets, strip every mask, return the sum.

        Raises ProtocolAbort (naming the client) if any needed secret has fewer than t
        shares; nothing is unmasked in that case.
        """
        self._expect(Stage.UNMASK)
        p = self.params
        u2, dropped = self._u2, self._u1 - self._u2
        if len(self._responses) < p.threshold:
            raise ProtocolAbort(
                f"only {len(self._responses)} unmask responses, threshold {p.threshold}"
            )
        b_shares: dict[str, list[shamir.Share]] = {u: [] for u in u2}
        s_shares: dict[str, list[shamir.Share]] = {
            d: [] for d in dropped if p.neighbours[d] & u2
        }
        for b, s in self._responses.values():
            for owner, share in b.items():
                b_shares[owner].append(share)
            for owner, share in s.items():
                if owner in s_shares:
                    s_shares[owner].append(share)
        for kind, table in (("self-mask seed", b_shares), ("masking key", s_shares)):
            for owner, got in sorted(table.items()):
                if len(got) < p.threshold:
                    raise ProtocolAbort(
                        f"{kind} of {owner!r} has {len(got)} shares, threshold {p.threshold}"
                    )
        assert self._sum is not None
        total = self._sum
        # Every key is recovered before any mask is removed, so an abort unmasks nothing.
        add: list[bytes] = []
        subtract: list[bytes] = []
        for owner in sorted(b_shares):
            seed = _reconstruct(b_shares[owner], f"self-mask seed of {owner!r}")
            if len(seed) != SEED_BYTES:
                raise ProtocolAbort(f"self-mask seed of {owner!r} has the wrong length")
            subtract.append(_self_mask_key(p, seed, owner))
        for owner in sorted(s_shares):
            raw = _reconstruct(s_shares[owner], f"masking key of {owner!r}")
            if len(raw) != 32:
                raise ProtocolAbort(f"masking key of {owner!r} has the wrong length")
            s_key = X25519PrivateKey.from_private_bytes(raw)
            if _public_bytes(s_key) != self._adverts[owner].s_public:
                raise ProtocolAbort(f"shares of {owner!r}'s masking key are inconsistent")
            for w in sorted(p.neighbours[owner] & u2):
                key = _pairwise_key(p, _exchange(s_key, self._adverts[w].s_public), w, owner)
                # w added sign(w, owner) * PRG; take it back out.
                (subtract if pairwise_sign(w, owner) > 0 else add).append(key)
        self._masker(total, add, subtract)
        responders = tuple(sorted(self._responses))
        self.stage = Stage.DONE
        self._sum = None
        self._responses = {}
        return AggregateResult(
            total=total, survivors=tuple(sorted(u2)), dropped=tuple(sorted(dropped)),
            responders=responders,
        )


def _reconstruct(shares: list[shamir.Share], what: str) -> bytes:
    try:
        return shamir.reconstruct(shares)
    except shamir.ShamirError as exc:
        raise ProtocolAbort(f"cannot reconstruct the {what}: {exc}") from exc
