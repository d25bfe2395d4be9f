"""Coverage-guided fuzzing of the wire decoders with atheris (libFuzzer), beside the
hypothesis suite in tests/fuzz (which CI runs): libFuzzer mutates toward new branches,
so it reaches corners that random structures seldom hit.

    pip install atheris      # not a dependency: wheels exist for CPython 3.11 on x86-64
    .venv/bin/python simulations/fuzz_atheris.py TARGET [libFuzzer flags, e.g. -runs=100000]

TARGET is one of the names in TARGETS (or `all`, each in turn with the same flags). A
target may only return or raise the module's own error type; anything else is a crash
that libFuzzer reports with the input that caused it (written as crash-<sha1>).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports():
    import msgpack

    from client.bundle import BundleError, parse_bundle
    from coordinator import state as sm
    from coordinator import wire
    from coordinator.audit.entry import Entry, PayloadError, validate_payload
    from privacy import secagg


def _structure(data: bytes) -> Any:
    """The input read as msgpack (any value, extension types included), else None: lets
    libFuzzer build maps and lists for the decoders that take decoded messages."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
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
    msg = _structure(data)
    if isinstance(msg, dict):
        try:
            wire.verify_signature(wire.unpack(wire.pack(msg)), "ab" * 32, 1.7e9)
        except (wire.WireError, ValueError, TypeError):  # pack of an unpackable value
            pass


def unsettled_run(data: bytes) -> None:
    wire.unsettled_run(_structure(data))


def secagg_from_wire(data: bytes) -> None:
    kinds = (secagg.Advertisement, secagg.KeyDirectory, secagg.EncryptedShares,
             secagg.MaskedInputRequest, secagg.MaskedInput, secagg.UnmaskRequest,
             secagg.UnmaskResponse)
    value = _structure(data[1:])
    try:
        kinds[data[0] % len(kinds) if data else 0].from_wire(value)
    except secagg.InvalidMessage:
        pass


def state_apply(data: bytes) -> None:
    cmd = _structure(data)
    state = sm.initial_state()
    sm.apply(state, {"op": "claim", "term": 1, "node": "n1"})
    before = json.dumps({k: v for k, v in state.items() if k not in ("seq",)}, sort_keys=True)
    result = sm.apply(state, cmd)
    if not result["ok"] and not (isinstance(cmd, dict) and isinstance(cmd.get("request_id"), str)):
        after = json.dumps({k: v for k, v in state.items() if k not in ("seq",)}, sort_keys=True)
        assert before == after, "a rejected command changed the state"


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


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*TARGETS, "all"):
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}|all}} [libFuzzer flags]")
    name, flags = sys.argv[1], sys.argv[2:]
    if name == "all":  # one process per target: libFuzzer runs once per process
        failed = [t for t in TARGETS
                  if subprocess.run([sys.executable, __file__, t, *flags]).returncode != 0]
        sys.exit(f"crashed: {', '.join(failed)}" if failed else 0)
    atheris.Setup([sys.argv[0], *flags], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
