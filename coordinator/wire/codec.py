"""Bytes on the wire: msgpack messages, request signatures and the model codec.

msgpack has no code execution on decode (unlike pickle) and carries bytes natively, so
models and updates need no base64; decoded messages may hold only plain values. Site
requests are signed with the site's enrolled Ed25519 identity key over a canonical
encoding, so a node can tell an enrolled site from anyone holding a certificate. Models
travel as safetensors of float32 tensors, flattened in sorted-name order.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from coordinator.wire.schema import (
    MAX_MESSAGE_BYTES,
    MAX_NESTING,
    MAX_UPDATE_ABS,
    SIGNATURE_WINDOW_S,
    WireError,
)


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
