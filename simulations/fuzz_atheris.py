"""Coverage-guided fuzzing of the decoders with atheris (libFuzzer), beside the hypothesis
suite in tests/fuzz (which CI runs): libFuzzer mutates real messages byte by byte and
keeps what reaches new branches of our (instrumented) modules.

    pip install atheris      # not a dependency: wheels exist for CPython 3.11 on x86-64
    .venv/bin/python simulations/fuzz_atheris.py seeds CORPUS         # real messages
    .venv/bin/python simulations/fuzz_atheris.py TARGET CORPUS/TARGET -runs=200000
    .venv/bin/python simulations/fuzz_atheris.py all CORPUS -runs=200000

TARGET is one of TARGETS. Structured targets read their input as msgpack (any value,
extension types and byte keys included), so seeds are packed messages and one flipped
type byte turns a string into a list. A target may only return or raise its module's own
error; anything else is a crash that libFuzzer reports with its input (crash-<sha1>).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
import cryptography.x509  # noqa: F401  (dependencies first: only our modules are instrumented)
import grpc  # noqa: F401
import msgpack
import numpy as np
import safetensors.numpy  # noqa: F401
import sqlalchemy  # noqa: F401
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

with atheris.instrument_imports(include=["coordinator", "client", "privacy"]):
    from client.enroll import BundleError, parse_bundle
    from coordinator import wire
    from coordinator.audit.entry import Entry, PayloadError, validate_payload
    from coordinator.core import state as sm
    from privacy import secagg


def _structure(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # not msgpack: nothing to decode
        return None


def unpack(data: bytes) -> None:
    try:
        wire.unpack(data)
    except wire.WireError:
        pass


def decode_model(data: bytes) -> None:
    try:
        wire.decode_model(data)
    except wire.WireError:
        pass


def decode_update(data: bytes) -> None:
    try:
        wire.decode_update(data[1:], data[0] if data else 0)
    except wire.WireError:
        pass


def verify_signature(data: bytes) -> None:
    try:  # as a node does: unpack, then verify
        wire.verify_signature(wire.unpack(data), wire.public_key_hex(_KEY), 1.7e9)
    except wire.WireError:
        pass


def unsettled_run(data: bytes) -> None:
    wire.unsettled_run(_structure(data))


_KINDS = (secagg.Advertisement, secagg.KeyDirectory, secagg.EncryptedShares,
          secagg.MaskedInputRequest, secagg.MaskedInput, secagg.UnmaskRequest,
          secagg.UnmaskResponse)


def secagg_from_wire(data: bytes) -> None:
    value = _structure(data[1:])
    try:
        _KINDS[data[0] % len(_KINDS) if data else 0].from_wire(value)
    except secagg.InvalidMessage:
        pass


def state_apply(data: bytes) -> None:
    state = sm.initial_state()
    sm.apply(state, {"op": "claim", "term": 1, "node": "n1"})
    before = repr({k: v for k, v in state.items() if k != "seq"})
    cmd = _structure(data)
    result = sm.apply(state, cmd)
    if not result["ok"] and not (isinstance(cmd, dict) and isinstance(cmd.get("request_id"), str)):
        assert repr({k: v for k, v in state.items() if k != "seq"}) == before, "state changed"


def audit_payload(data: bytes) -> None:
    value = _structure(data)
    try:
        if isinstance(value, list) and len(value) == 2:
            validate_payload(value[0], value[1])
        else:
            Entry.from_dict(value)
    except PayloadError:
        pass


def client_bundle(data: bytes) -> None:
    try:
        parse_bundle(data)
    except BundleError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "unpack": unpack, "decode_model": decode_model, "decode_update": decode_update,
    "verify_signature": verify_signature, "unsettled_run": unsettled_run,
    "secagg_from_wire": secagg_from_wire, "state_apply": state_apply,
    "audit_payload": audit_payload, "client_bundle": client_bundle,
}
_KEY = Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)


def seeds(root: Path) -> None:
    """Real messages for each target's starting corpus."""
    run = {"round": 1, "attempt": 1, "term": 2, "noise_multiplier": 1.1, "sample_rate": 0.25,
           "steps": 8, "clip_norm": 1.0, "delta": 1e-5}
    signed = wire.sign({"site": "a", "round": 1, "update": b"\0" * 8, "unsettled": [run]}, _KEY)
    commands = [{"op": "stop"}, {"op": "claim", "term": 2, "node": "n2"},
                {"op": "enroll", "site": "s", "public_key": "ab" * 32, "epsilon": 1.0},
                {"op": "train", "rounds": 2, "config": {"clip": 0.5}},
                {"op": "genesis", "version": "ab" * 32, "size": 3, "holders": ["n1"],
                 "cluster_size": 1}]
    advert = {"context": b"c", "client_id": "a", "c_public": b"k" * 32, "s_public": b"l" * 32,
              "signature": b"s" * 64}
    corpus: dict[str, list[bytes]] = {
        "unpack": [wire.pack(signed)], "verify_signature": [wire.pack(signed)],
        "decode_model": [wire.encode_model({"w": np.ones((2, 3), np.float32)})],
        "decode_update": [b"\x02" + wire.encode_update(np.ones(2, np.float32))],
        "unsettled_run": [msgpack.packb(run)],
        "secagg_from_wire": [bytes([i]) + msgpack.packb(m) for i, m in enumerate((
            advert, {"context": b"c", "recipient": "a", "adverts": [advert]},
            {"context": b"c", "sender": "a", "ciphertexts": {"b": b"x" * 40}},
            {"context": b"c", "recipient": "a", "survivors": ["a", "b"], "ciphertexts": {}},
            {"context": b"c", "sender": "a", "vector": b"\0" * 8},
            {"context": b"c", "survivors": ["a"], "dropped": ["b"]},
            {"context": b"c", "sender": "a", "self_mask_shares": {}, "key_shares": {}}))],
        "state_apply": [msgpack.packb(c) for c in commands],
        "audit_payload": [msgpack.packb(["client_enrolled", {"site": "s", "public_key": "k",
                                                              "epsilon": 1.0, "delta": 1e-5}]),
                          msgpack.packb({"seq": 1, "kind": "x", "payload": {}, "raft_index": 1,
                                         "prev_hash": "0", "entry_hash": "1", "key_id": "k",
                                         "signature": "s"})],
        "client_bundle": [b'{"format": "fedraft-site-bundle", "version": 1, "site": "a", '
                          b'"public_key": "' + b"ab" * 32 + b'", "nodes": ["h:1"], "ca_pem": "", '
                          b'"cert_pem": "", "key_pem": "", "created": "", '
                          b'"budget": {"epsilon": 1.0, "delta": 1e-05}}'],
    }
    for target, items in corpus.items():
        (root / target).mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            (root / target / f"seed-{i}").write_bytes(item)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in (*TARGETS, "all", "seeds"):
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}|all|seeds}} CORPUS [flags]")
    name, corpus, flags = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if name == "seeds":
        seeds(corpus)
    elif name == "all":  # one process per target: libFuzzer runs once per process
        import subprocess

        failed = [t for t in TARGETS if subprocess.run(
            [sys.executable, __file__, t, str(corpus / t), *flags]).returncode != 0]
        sys.exit(f"crashed: {', '.join(failed)}" if failed else 0)
    else:  # CORPUS may also be one input file, to replay a crash
        if not corpus.exists():
            corpus.mkdir(parents=True)
        atheris.Setup([sys.argv[0], str(corpus), *flags], TARGETS[name])
        atheris.Fuzz()


if __name__ == "__main__":
    main()
