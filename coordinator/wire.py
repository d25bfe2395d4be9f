"""The public wire schema shared by nodes, the CLI and site agents.

This is the one coordinator module the client may import. Messages are msgpack maps
(no pickle, no extension types) carried by gRPC over mutual TLS; models travel as
safetensors. Site requests are signed with the site's enrolled Ed25519 identity key
over a canonical encoding, so a node can tell an enrolled site from anyone holding a
certificate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import grpc
import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FLEET_SERVICE = "fedraft.Fleet"
ADMIN_SERVICE = "fedraft.Admin"
FLEET_METHODS = ("Poll", "GetBlob", "Submit")
ADMIN_METHODS = (
    "Status", "Enroll", "Revoke", "Sites", "InitModel", "Train", "Stop",
    "RoundStatus", "GetBlob", "PutBlob", "AddNode", "RemoveNode", "TransferLeader",
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_UPDATE_ABS = 1.0e6
MAX_EXAMPLES = 1_000_000_000
SIGNATURE_WINDOW_S = 300.0
POLL_WAIT_MAX_S = 10.0
HEX64_CHARS = frozenset("0123456789abcdef")
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + 1024),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES + 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A node that died comes back (or its successor answers) within seconds. gRPC's
    # default reconnect backoff (1 s, growing to 120 s) keeps failing calls to it at once
    # with UNAVAILABLE long after it is up: sites then skip a live leader for seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class WireError(ValueError):
    """A message that does not fit the schema; carries a stable code for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def pack(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError("too_large", f"message of {len(data)} bytes exceeds the limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError("malformed", f"not a msgpack message: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise WireError("malformed", "message must be a map")
    _check_plain(obj)
    return obj


MAX_NESTING = 32
"""Deepest nesting of maps and lists a message may have (ours go about 6 deep)."""
_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(obj: Any) -> None:
    """Only plain values, maps with string keys, and bounded nesting: msgpack would also
    hand over extension types, timestamps, byte keys and 1000-deep structures, which
    handlers (and the recursive signature encoding) must never meet."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, _PLAIN):
            continue
        if depth >= MAX_NESTING:
            raise WireError("malformed", f"message nests deeper than {MAX_NESTING} levels")
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise WireError("malformed", "map keys must be strings")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        else:
            raise WireError("malformed", f"{type(value).__name__} is not part of the schema")


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message, **extra}


# ---------------------------------------------------------------- signatures


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[k, _canonical(value[k])] for k in sorted(value)]
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def signing_bytes(message: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a message without its signature: sorted keys, msgpack."""
    body = {k: v for k, v in message.items() if k != "sig"}
    return b"fedraft-request-v1\x00" + msgpack.packb(_canonical(body), use_bin_type=True)


def sign(message: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    message = dict(message)
    message.setdefault("ts", time.time())
    message["sig"] = key.sign(signing_bytes(message))
    return message


def verify_signature(message: Mapping[str, Any], public_key_hex: str, now: float) -> None:
    sig = message.get("sig")
    ts = message.get("ts")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise WireError("unsigned", "request carries no Ed25519 signature")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise WireError("unsigned", "request carries no timestamp")
    if not abs(now - ts) <= SIGNATURE_WINDOW_S:  # NaN too: it would never go stale
        raise WireError("stale", "request timestamp is outside the accepted window")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            sig, signing_bytes(message)
        )
    except (InvalidSignature, ValueError):
        raise WireError("bad_signature", "signature does not match the enrolled key") from None


def public_key_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


# ---------------------------------------------------------------- models and updates


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_model(params: Mapping[str, np.ndarray]) -> bytes:
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    return st_save(arrays)


def decode_model(data: bytes) -> dict[str, np.ndarray]:
    try:
        arrays = st_load(data)
    except Exception as exc:
        raise WireError("malformed", f"not a safetensors model: {exc}") from None
    out = {}
    for name in sorted(arrays):
        arr = arrays[name]
        if arr.dtype != np.float32:
            raise WireError("malformed", f"tensor {name!r} is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            raise WireError("not_finite", f"tensor {name!r} holds NaN or infinite values")
        out[name] = arr
    return out


def model_size(params: Mapping[str, np.ndarray]) -> int:
    return int(sum(int(np.prod(v.shape)) for v in params.values()))


def flatten(params: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float32 vector in sorted-name order: the layout every party agrees on."""
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(
        [np.asarray(params[k], dtype=np.float32).ravel() for k in sorted(params)]
    )


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name in sorted(like):
        shape = like[name].shape
        n = int(np.prod(shape))
        out[name] = np.asarray(vector[pos : pos + n], dtype=np.float32).reshape(shape)
        pos += n
    if pos != vector.size:
        raise WireError("wrong_length", f"vector has {vector.size} values, model has {pos}")
    return out


def decode_update(data: Any, expected_len: int) -> np.ndarray:
    """Validate a site's float32 update vector: length, finiteness, magnitude."""
    if not isinstance(data, bytes):
        raise WireError("malformed", "update must be bytes")
    if len(data) != 4 * expected_len:
        raise WireError(
            "wrong_length", f"update has {len(data) // 4} values, the model has {expected_len}"
        )
    vec = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(vec).all():
        raise WireError("not_finite", "update contains NaN or infinite values")
    if vec.size and float(np.abs(vec).max()) > MAX_UPDATE_ABS:
        raise WireError("out_of_range", f"update values exceed {MAX_UPDATE_ABS:g} in magnitude")
    return vec


def encode_update(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


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
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
        return None
    dp = [entry.get(k) for k in UNSETTLED_DP]
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) for v in dp):
        return None
    sigma, q, steps, clip, delta = (float(v) for v in dp)
    if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and steps == int(steps) and clip > 0
            and 0 < delta < 1):
        return None
    return {"round": ints[0], "attempt": ints[1], "term": ints[2], "noise_multiplier": sigma,
            "sample_rate": q, "steps": steps, "clip_norm": clip, "delta": delta}


class Channel:
    """A connection to one node's API over mutual TLS: `call(service, method, message)`.

    gRPC (HTTP/2) carries msgpack bodies through generic handlers, so the schema is
    this module rather than generated protobuf code.
    """

    def __init__(self, address: str, ca: bytes, cert: bytes, key: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        self.address = address
        self._channel = grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
        self._stubs: dict[str, Any] = {}

    def call(self, service: str, method: str, message: dict[str, Any],
             timeout: float = 10.0) -> dict[str, Any]:
        """Raises grpc.RpcError for transport failures; returns the reply map otherwise."""
        path = f"/{service}/{method}"
        stub = self._stubs.get(path)
        if stub is None:
            stub = self._channel.unary_unary(path)
            self._stubs[path] = stub
        return unpack(stub(pack(message), timeout=timeout))

    def close(self) -> None:
        self._channel.close()
