"""Pure core: canonical encoding, entry hashing, RFC 6962 Merkle trees, keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.audit.canonical import (
    INT64_MAX,
    INT64_MIN,
    CanonicalError,
    canonical_bytes,
    canonical_text,
    normalize,
)
from coordinator.audit.entry import (
    PayloadError,
    compute_entry_hash,
    validate_payload,
)
from coordinator.audit.keys import AuditKeyError, AuditSigner, key_id_for, parse_public_key
from coordinator.audit.merkle import EMPTY_ROOT, MerkleAccumulator, merkle_root

# Leaves and roots from RFC 6962's reference test data (certificate-transparency).
CT_LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
             "606162636465666768696a6b6c6d6e6f"]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def test_canonical_form_is_pinned() -> None:
    value = {"b": [1, 1.0, 1e-05, 1e16, -0.0, 0.1], "a": "x\u007f\u2028\x01\n\"\\é😀", "z": None,
             "t": True}
    assert canonical_text(value) == (
        '{"a":"x\u007f\u2028\\u0001\\n\\"\\\\é😀","b":[1,1.0,1e-05,1e+16,-0.0,0.1],'
        '"t":true,"z":null}'
    )


def test_entry_hash_is_pinned() -> None:
    # Changing this hash breaks every existing log: it must never change silently.
    h = compute_entry_hash(3, "round_aborted", {"round": 1, "attempt": 0, "term": 2,
                                                "reason": "timeout"}, 17, "ab" * 32, "k1")
    preimage = (
        '{"key_id":"k1","kind":"round_aborted","payload":{"attempt":0,"reason":"timeout",'
        '"round":1,"term":2},"prev_hash":"' + "ab" * 32 + '","raft_index":17,"seq":3,"v":1}'
    )
    import hashlib

    assert h == hashlib.sha256(preimage.encode()).hexdigest()


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), {1: "x"}, {"a": {2, 3}}, 2**63, "\ud800", b"bytes", object()],
)
def test_normalize_rejects_values_without_a_canonical_form(bad: object) -> None:
    with pytest.raises(CanonicalError):
        normalize({"v": bad})


def test_normalize_turns_tuples_and_numpy_scalars_into_plain_json() -> None:
    np = pytest.importorskip("numpy")
    assert normalize({"a": (1, 2), "b": np.float64(0.5), "c": np.int32(7)}) == {
        "a": [1, 2], "b": 0.5, "c": 7}


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_encoding_survives_a_json_round_trip(value: object) -> None:
    clean = normalize(value)
    encoded = canonical_bytes(clean)
    decoded = json.loads(encoded)
    assert canonical_bytes(decoded) == encoded
    assert canonical_bytes(normalize(decoded)) == encoded


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_round_trip_exactly(x: float) -> None:
    back = json.loads(canonical_text([x]))[0]
    assert back == x and math.copysign(1, back) == math.copysign(1, x)


def test_ints_and_floats_stay_distinct() -> None:
    assert canonical_text(1) != canonical_text(1.0)
    assert type(json.loads(canonical_text(1.0))) is float


def test_merkle_matches_rfc6962_vectors() -> None:
    leaves = [bytes.fromhex(x) for x in CT_LEAVES]
    assert merkle_root([]) == EMPTY_ROOT == MerkleAccumulator().root()
    acc = MerkleAccumulator()
    for n, leaf in enumerate(leaves, start=1):
        acc.append(leaf)
        assert merkle_root(leaves[:n]).hex() == CT_ROOTS[n - 1]
        assert acc.root().hex() == CT_ROOTS[n - 1]


def test_accumulator_matches_recursive_definition_at_every_size() -> None:
    leaves = [bytes([i % 256, i // 256]) * 16 for i in range(300)]
    acc = MerkleAccumulator()
    for n in range(1, len(leaves) + 1):
        acc.append(leaves[n - 1])
        if n < 70 or n % 37 == 0 or n == 256:
            assert acc.root() == merkle_root(leaves[:n]), n
    twin = acc.copy()
    twin.append(b"x")
    assert twin.size == acc.size + 1 and acc.root() == merkle_root(leaves)


def test_payload_rules_catch_coordinator_bugs() -> None:
    good = {"round": 1, "attempt": 0, "term": 1, "reason": "x"}
    validate_payload("round_aborted", good)
    validate_payload("some_future_kind", {"anything": 1})
    with pytest.raises(PayloadError, match="lacks 'reason'"):
        validate_payload("round_aborted", {k: v for k, v in good.items() if k != "reason"})
    with pytest.raises(PayloadError, match="must be an integer"):
        validate_payload("round_aborted", {**good, "round": "1"})
    with pytest.raises(PayloadError, match="hex"):
        validate_payload("model_genesis", {"version": "ABC", "size": 1})
    with pytest.raises(PayloadError, match="snake_case"):
        validate_payload("Round Opened", {})
    charges = {"s": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, "clip_norm": 1.0,
                     "epsilon": 0.5}}
    with pytest.raises(PayloadError, match="charges"):
        validate_payload("round_committed", {
            "round": 1, "attempt": 0, "term": 1, "version": "a" * 64, "parent": "b" * 64,
            "size": 1, "participants": [], "survivors": [], "metrics": {}, "charges": charges})


def test_keys_round_trip_through_files(tmp_path: Path) -> None:
    signer = AuditSigner.generate()
    signer.save(tmp_path / "k.pem")
    again = AuditSigner.from_file(tmp_path / "k.pem")
    assert again.public_key == signer.public_key and again.key_id == key_id_for(signer.public_key)
    (tmp_path / "seed").write_text("11" * 32)
    assert AuditSigner.from_file(tmp_path / "seed").key_id == AuditSigner.from_seed(
        b"\x11" * 32).key_id
    assert parse_public_key(signer.public_key_hex) == signer.public_key
    with pytest.raises(AuditKeyError):
        parse_public_key("abcd")
