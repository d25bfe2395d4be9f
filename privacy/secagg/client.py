"""The site's side of SecAgg+: `SecAggClient`, one per site and session.

The client draws every key, seed and nonce from the `rng` callable it is given (an
os.urandom-like `Rng`), shares its self-mask seed b_u and masking key s_u among its
neighbours (AES-GCM per neighbour), masks its input with exactly the neighbours in U1 and
answers one unmask request only, never revealing both secrets of one neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
    _NO_ENC,
    _NONCE_BYTES,
    _RAW,
    _RAW_PRIV,
    SEED_BYTES,
    SecAggParams,
    _advert_transcript,
    _exchange,
    _id_bytes,
    _lp,
    _normalise_identities,
    _pairwise_key,
    _public_bytes,
    _self_mask_key,
    _share_aad,
    _share_key,
    pairwise_sign,
)

Rng = Callable[[int], bytes]
"""An os.urandom-like callable: n -> n random bytes."""


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
