"""The coordinator's side of SecAgg+: `SecAggServer`, one per session.

The server routes the clients' messages between stages, keeps a running sum of the
masked inputs and, once enough unmask shares are in, reconstructs the self-mask seeds of
the survivors and the masking keys of the dropped clients and strips every mask, through
a `MaskApplier` the coordinator may spread over processes.

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

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import shamir
from privacy.prg import apply_masks
from privacy.secagg.errors import (
    DuplicateMessage,
    InvalidMessage,
    ProtocolAbort,
    StageError,
    UnknownParticipant,
)
from privacy.secagg.messages import (
    Advertisement,
    AggregateResult,
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    MaskedInputRequest,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    _check_context,
    _parse_share,
    verify_advertisement,
)
from privacy.secagg.params import (
    _MAX_CIPHERTEXT,
    _NONCE_BYTES,
    SEED_BYTES,
    SecAggParams,
    _exchange,
    _normalise_identities,
    _pairwise_key,
    _public_bytes,
    _self_mask_key,
    pairwise_sign,
)

MaskApplier = Callable[[np.ndarray, Sequence[bytes], Sequence[bytes]], None]
"""Adds the PRG masks of the first keys to a uint32 vector and subtracts the second's."""


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

    def receive_advertisement(self, advert: Advertisement, sender: str | None = None) -> None:
        """Accept one client's signed advertisement; `sender` is the authenticated caller."""
        _same_sender(sender, advert.client_id)
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

    def receive_shares(self, msg: EncryptedShares, sender: str | None = None) -> None:
        """Accept one client's encrypted shares (one ciphertext per advertised neighbour)."""
        _same_sender(sender, msg.sender)
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

    def receive_masked_input(self, msg: MaskedInput, sender: str | None = None) -> None:
        """Accept one masked vector and add it to the running sum."""
        _same_sender(sender, msg.sender)
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

    def receive_unmask(self, msg: UnmaskResponse, sender: str | None = None) -> None:
        """Accept one client's shares; they must be exactly the ones the server asked for."""
        _same_sender(sender, msg.sender)
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


def _same_sender(sender: str | None, claimed: str) -> None:
    """A message must name the party that sent it: a site relaying another's message as
    its own is refused before anything is taken in (`sender` None: the caller has no
    transport identity to compare, as in simulations)."""
    if sender is not None and sender != claimed:
        raise InvalidMessage(f"message names {claimed!r}, not the caller {sender!r}")


def _reconstruct(shares: list[shamir.Share], what: str) -> bytes:
    try:
        return shamir.reconstruct(shares)
    except shamir.ShamirError as exc:
        raise ProtocolAbort(f"cannot reconstruct the {what}: {exc}") from exc
