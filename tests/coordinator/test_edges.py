"""The node's edges on their own: wire codec, signatures, blob store, configuration, PKI."""

import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator import wire
from coordinator.cluster import pki
from coordinator.cluster.blobs import BlobError, BlobStore
from coordinator.cluster.config import ConfigError, NodeAddress, load_node_config, render_node_config


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcdefgh.", min_size=1, max_size=8),
                       hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5),
                                  elements=st.floats(-1e3, 1e3, width=32)),
                       min_size=1, max_size=5))
def test_model_codec_and_flatten_round_trip(params):
    data = wire.encode_model(params)
    back = wire.decode_model(data)
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    vec = wire.flatten(params)
    assert vec.size == wire.model_size(params)
    again = wire.unflatten(vec, params)
    for k in params:
        np.testing.assert_array_equal(again[k], params[k])
    assert wire.sha256_hex(wire.encode_model(back)) == wire.sha256_hex(data)


def test_decode_update_rejects_bad_vectors():
    good = np.ones(4, dtype=np.float32)
    np.testing.assert_array_equal(wire.decode_update(wire.encode_update(good), 4), good)
    cases = [(good[:3], "wrong_length"), (np.array([1, np.nan, 0, 0], np.float32), "not_finite"),
             (np.array([1, np.inf, 0, 0], np.float32), "not_finite"),
             (np.array([2e6, 0, 0, 0], np.float32), "out_of_range")]
    for vec, code in cases:
        with pytest.raises(wire.WireError) as exc:
            wire.decode_update(wire.encode_update(vec), 4)
        assert exc.value.code == code
    with pytest.raises(wire.WireError):
        wire.decode_update("not bytes", 4)


def test_signatures_bind_every_field_and_time():
    key = Ed25519PrivateKey.generate()
    pub = wire.public_key_hex(key)
    msg = wire.sign({"site": "a", "round": 3, "update": b"\x01\x02"}, key)
    wire.verify_signature(msg, pub, time.time())
    for field, value in (("round", 4), ("update", b"\x01\x03"), ("site", "b")):
        with pytest.raises(wire.WireError) as exc:
            wire.verify_signature({**msg, field: value}, pub, time.time())
        assert exc.value.code == "bad_signature"
    with pytest.raises(wire.WireError) as exc:
        wire.verify_signature(msg, pub, time.time() + 3600)
    assert exc.value.code == "stale"
    with pytest.raises(wire.WireError) as exc:
        wire.verify_signature({k: v for k, v in msg.items() if k != "sig"}, pub, time.time())
    assert exc.value.code == "unsigned"


def test_unpack_rejects_garbage():
    for data in (b"", b"\xc1", wire.pack([1, 2])[:1], b"\x91\x01"):
        with pytest.raises(wire.WireError):
            wire.unpack(data)


def test_blob_store_is_content_addressed(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put(b"hello")
    assert store.get(digest) == b"hello" and store.has(digest)
    with pytest.raises(BlobError):
        store.put(b"hello", expected="0" * 64)
    (tmp_path / digest).write_bytes(b"tampered")
    with pytest.raises(BlobError, match="corrupt"):
        store.get(digest)
    with pytest.raises(BlobError):
        store.get("../etc/passwd")


def _write_config(tmp_path: Path, **overrides) -> Path:
    me = NodeAddress("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    peer = NodeAddress("n2", "127.0.0.1:4", "127.0.0.1:5", "127.0.0.1:6")
    text = render_node_config(me, [peer], tmp_path / "data", tmp_path / "ca.pem",
                              tmp_path / "n1.pem", tmp_path / "n1.key")
    for old, new in overrides.items():
        text = text.replace(old, new)
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_node_config_env_override_and_named_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 20)
    cfg = load_node_config(_write_config(tmp_path))
    assert cfg.self_addr.id == "n1" and cfg.peers[0].id == "n2"
    monkeypatch.setenv("FEDRAFT_RAFT_ELECTION_MIN_S", "1.5")
    monkeypatch.setenv("FEDRAFT_RAFT_ELECTION_MAX_S", "3")
    assert load_node_config(_write_config(tmp_path)).election_min_s == 1.5
    monkeypatch.delenv("FEDRAFT_RAFT_ELECTION_MIN_S")
    monkeypatch.delenv("FEDRAFT_RAFT_ELECTION_MAX_S")
    bad = {
        'raft = "127.0.0.1:1"': ('raft = "nope"', "node.raft"),
        "election_min_s = 0.8": ("election_min_s = 9.0", "raft.election_max_s"),
        '[[peers]]\nid = "n2"': ('[[peers]]\nid = "n2"\ncolour = "red"', "peers[0].colour"),
        "[tls]": ("[bogus]\n[tls]", "bogus"),
    }
    for old, (new, key) in bad.items():
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_node_config(_write_config(tmp_path, **{old: new}))
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "short")
    with pytest.raises(ConfigError, match="raft.password"):
        load_node_config(_write_config(tmp_path))


def test_certificates_carry_their_role(tmp_path):
    pki.init_ca(tmp_path / "ca")
    with pytest.raises(FileExistsError):
        pki.init_ca(tmp_path / "ca")
    ident = pki.issue(tmp_path / "ca", tmp_path / "out", "auditor", "carol")
    assert pki.subject_of(ident.cert.read_bytes()) == ("carol", "auditor")
    assert oct(ident.key.stat().st_mode)[-3:] == "600"
    with pytest.raises(ValueError):
        pki.issue(tmp_path / "ca", tmp_path / "out", "king", "x")
