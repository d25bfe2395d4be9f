"""SecAgg+ (Bell et al., CCS 2020) as transport-free, message-driven state objects.

The coordinator holds one `SecAggServer` per session and each site one `SecAggClient`;
they exchange the message dataclasses of `messages` over any transport (`to_wire()` gives
plain str/bytes/int/list/dict values for msgpack; `from_wire()` checks types). Nothing here
does I/O, reads a clock or draws randomness except through the `rng` callable passed in.

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

Modules, each importing only those above it:

    errors    SecAggError and its subclasses
    params    constants, SecAggParams, the neighbour graph and every key derivation
              (security notes on the graph and threshold)
    messages  the message dataclasses and their wire form, Stage, AggregateResult,
              verify_advertisement
    client    SecAggClient
    server    SecAggServer (threat model)
"""

from __future__ import annotations

from privacy.secagg.client import Rng, SecAggClient
from privacy.secagg.errors import (
    BadSignature,
    DuplicateMessage,
    InvalidMessage,
    ProtocolAbort,
    SecAggError,
    StageError,
    UnknownParticipant,
    WrongContext,
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
    verify_advertisement,
)
from privacy.secagg.params import (
    MASK_KEY_BYTES,
    MAX_ID_BYTES,
    SEED_BYTES,
    SecAggParams,
    default_degree,
    default_threshold,
    make_context,
    pairwise_sign,
)
from privacy.secagg.server import MaskApplier, SecAggServer

__all__ = [
    "MASK_KEY_BYTES",
    "MAX_ID_BYTES",
    "SEED_BYTES",
    "Advertisement",
    "AggregateResult",
    "BadSignature",
    "DuplicateMessage",
    "EncryptedShares",
    "InvalidMessage",
    "KeyDirectory",
    "MaskApplier",
    "MaskedInput",
    "MaskedInputRequest",
    "ProtocolAbort",
    "Rng",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "Stage",
    "StageError",
    "UnknownParticipant",
    "UnmaskRequest",
    "UnmaskResponse",
    "WrongContext",
    "default_degree",
    "default_threshold",
    "make_context",
    "pairwise_sign",
    "verify_advertisement",
]
