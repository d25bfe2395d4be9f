"""SecAgg+ public parameters, constants and key derivations shared by both sides.

`SecAggParams` is what every party of one session agrees on; from it follow the
session id, each client's Shamir x coordinate and the public neighbour graph. The
helpers here derive every key of the protocol (pairwise masks, self masks, share
encryption) and the advertisement transcript, each bound to the session id.

Security notes. Each client only masks with neighbours in a sparse graph derived from a
public seed (degree about 2 log2 n). The threshold must exceed half the degree; a client
masks only if at least t neighbours are in U1, answers one unmask request only and never
reveals both b_v and s_v for one v, so no single answer set yields t shares of both of one
client's secrets. All key derivations and ciphertexts are bound to a session id that
hashes the context (federation, round, attempt, term) and every public parameter, so
nothing carries over between rounds or attempts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.secagg.errors import InvalidMessage, UnknownParticipant

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
