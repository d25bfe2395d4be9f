"""Fuzz the wire decoders: each returns a valid value or raises WireError, nothing else."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from coordinator import wire
from tests.fuzz.common import count, finite, fuzz, hostile, is_plain, mutated, plain, scalars

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = wire.public_key_hex(KEY)
NOW = 1_700_000_000.0
SIGNED = wire.sign({"site": "hospital-a", "round": 3, "attempt": 1, "term": 2,
                    "stage": "collect", "update": b"\x00" * 16, "num_examples": 120,
                    "metrics": {"loss": 0.25}, "ts": NOW,
                    "unsettled": [{"round": 2, "attempt": 1, "term": 2,
                                   "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8,
                                   "clip_norm": 1.0, "delta": 1e-5}]}, KEY)
PACKED = wire.pack(SIGNED)
MODEL = wire.encode_model({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                           "b": np.ones(3, dtype=np.float32)})


def _unpacked(data: bytes) -> dict[str, Any] | None:
    try:
        msg = wire.unpack(data)
    except wire.WireError as exc:
        assert exc.code in ("malformed", "too_large") and exc.message
        return None
    assert isinstance(msg, dict) and is_plain(msg)
    return msg


@fuzz
@given(st.binary(max_size=512))
def test_unpack_random_bytes(data: bytes) -> None:
    count("wire.unpack bytes")
    _unpacked(data)


@fuzz
@given(hostile())
def test_unpack_random_structures(value: Any) -> None:
    count("wire.unpack structures")
    try:
        data = msgpack.packb(value, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):  # not encodable at all (too deep, ...)
        return
    msg = _unpacked(data)
    if msg is not None:
        # NaN never equals itself, nested ones included: then the bytes must round-trip
        assert msg == value or msgpack.packb(msg, use_bin_type=True) == data


@fuzz
@given(mutated(PACKED))
def test_unpack_mutated_request(data: bytes) -> None:
    count("wire.unpack mutated")
    _unpacked(data)


def _model_ok(data: bytes) -> None:
    try:
        params = wire.decode_model(data)
    except wire.WireError as exc:
        assert exc.code in ("malformed", "not_finite")
        return
    for name, arr in params.items():
        assert isinstance(name, str) and arr.dtype == np.float32 and np.isfinite(arr).all()
    wire.flatten(params)


@fuzz
@given(st.binary(max_size=512))
def test_decode_model_random_bytes(data: bytes) -> None:
    count("wire.decode_model bytes")
    _model_ok(data)


@fuzz
@given(mutated(MODEL))
def test_decode_model_mutated_bytes(data: bytes) -> None:
    count("wire.decode_model mutated")
    _model_ok(data)


_JSON = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                  st.text(max_size=12))
_DTYPES = st.sampled_from(["F32", "F16", "F64", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "X", 7])
_TENSOR = st.fixed_dictionaries({
    "dtype": _DTYPES,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | st.just([2, 3]) | _JSON,
    "data_offsets": st.lists(st.integers(-4, 2**40), min_size=0, max_size=3)
    | st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
})


@fuzz
@given(st.dictionaries(st.text(max_size=8), _TENSOR | _JSON, max_size=4),
       st.binary(max_size=96), st.integers(-8, 8), st.booleans())
def test_decode_model_forged_header(header: dict[str, Any], body: bytes, skew: int,
                                    nan: bool) -> None:
    """A well-framed safetensors file whose JSON header lies about dtypes, shapes and
    offsets (or whose floats are NaN): still a WireError or a valid model."""
    count("wire.decode_model forged header")
    if nan:
        body = struct.pack("<4f", float("nan"), 1.0, 2.0, 3.0) + body
    raw = json.dumps(header).encode()
    _model_ok(struct.pack("<Q", max(0, len(raw) + skew)) + raw + body)


@fuzz
@given(st.one_of(st.binary(max_size=96), scalars,
                 st.lists(st.floats(width=32), max_size=24).map(
                     lambda v: np.asarray(v, dtype="<f4").tobytes())),
       st.integers(0, 24))
def test_decode_update(data: Any, expected_len: int) -> None:
    count("wire.decode_update")
    try:
        vec = wire.decode_update(data, expected_len)
    except wire.WireError as exc:
        assert exc.code in ("malformed", "wrong_length", "not_finite", "out_of_range")
        return
    assert vec.dtype == np.dtype("<f4") and vec.size == expected_len
    assert np.isfinite(vec).all() and (vec.size == 0 or np.abs(vec).max() <= wire.MAX_UPDATE_ABS)


_FIELDS = st.sampled_from(sorted(SIGNED) + ["extra", "sig", "ts"])


@st.composite
def _tampered(draw: st.DrawFn) -> dict[str, Any]:
    """The signed request with fields changed, dropped or added, or rebuilt from bytes."""
    how = draw(st.sampled_from(("field", "drop", "bytes", "random")))
    if how == "bytes":
        msg = _unpacked(draw(mutated(PACKED)))
        return msg if msg is not None else {}
    if how == "random":
        return draw(st.dictionaries(st.text(max_size=8), plain(), max_size=6))
    msg = dict(SIGNED)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(_FIELDS)
        if how == "drop":
            msg.pop(name, None)
        else:
            msg[name] = draw(plain())
    return msg


@fuzz
@given(_tampered(), st.one_of(st.just(PUB), st.text(max_size=70), st.just(PUB.upper())),
       st.floats(allow_nan=False, min_value=NOW - 400, max_value=NOW + 400))
def test_verify_signature(msg: dict[str, Any], key: str, now: float) -> None:
    """Only the untouched request, with its key, inside the window, verifies."""
    count("wire.verify_signature")
    try:
        wire.verify_signature(msg, key, now)
    except wire.WireError as exc:
        assert exc.code in ("unsigned", "stale", "bad_signature")
        return
    assert wire.signing_bytes(msg) == wire.signing_bytes(SIGNED) and msg["sig"] == SIGNED["sig"]
    assert abs(now - SIGNED["ts"]) <= wire.SIGNATURE_WINDOW_S


def test_verify_signature_refuses_nan_timestamp() -> None:
    msg = wire.sign({"site": "a", "ts": float("nan")}, KEY)
    with pytest.raises(wire.WireError) as exc:
        wire.verify_signature(msg, PUB, time.time())
    assert exc.value.code == "stale"


_RUN_KEYS = ("round", "attempt", "term", *wire.UNSETTLED_DP)


@fuzz
@given(st.one_of(
    scalars,
    st.dictionaries(st.sampled_from(_RUN_KEYS) | st.text(max_size=6), scalars, max_size=9),
    st.fixed_dictionaries({k: scalars for k in _RUN_KEYS}),
    st.fixed_dictionaries({k: st.one_of(st.integers(-1, 3), st.floats(-1, 2)) for k in _RUN_KEYS}),
))
def test_unsettled_run(entry: Any) -> None:
    count("wire.unsettled_run")
    run = wire.unsettled_run(entry)
    if run is None:
        return
    assert set(run) == set(_RUN_KEYS)
    assert all(type(run[k]) is int and run[k] >= 0 for k in ("round", "attempt", "term"))
    assert all(finite(run[k]) for k in wire.UNSETTLED_DP)
    assert run["noise_multiplier"] > 0 and 0 < run["sample_rate"] <= 1 and run["clip_norm"] > 0
    assert 0 < run["delta"] < 1 and run["steps"] >= 0


def test_unpack_refuses_what_is_not_schema() -> None:
    """The cases the fuzzer found: extension types, timestamps, byte keys, deep nesting."""
    deep: Any = 0
    for _ in range(wire.MAX_NESTING + 1):
        deep = [deep]
    for value in ({"a": msgpack.ExtType(1, b"x")}, {"a": msgpack.Timestamp(1, 0)},
                  {"a": 1, b"b": 2}, {"a": deep}):
        with pytest.raises(wire.WireError) as exc:
            wire.unpack(msgpack.packb(value, use_bin_type=True))
        assert exc.value.code == "malformed"
    assert wire.unpack(PACKED) == SIGNED
