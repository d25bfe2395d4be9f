"""Fuzz every SecAgg+ `from_wire` decoder, and the parties that receive what it returns.

Decoders return a well-typed message or raise InvalidMessage. A server or client given a
decoded but wrong message raises InvalidMessage (or ProtocolAbort on the client, which
then leaves the session) and, when it refuses, keeps its state: nothing else escapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from privacy import secagg
from tests.fuzz.common import count, fuzz, plain, tweak
from tests.privacy.sa_driver import det_rng, identities, make_params

PARAMS = make_params(3, 4)
KEYS = identities(PARAMS.participants)
PUB = {cid: k.public_key() for cid, k in KEYS.items()}
IDS = PARAMS.participants
LAST = IDS[-1]


def _clients() -> dict[str, secagg.SecAggClient]:
    return {cid: secagg.SecAggClient(PARAMS, cid, KEYS[cid], PUB, det_rng(cid.encode()))
            for cid in IDS}


def _session() -> dict[str, Any]:
    """One complete session's messages, in wire form, by type."""
    clients = _clients()
    server = secagg.SecAggServer(PARAMS, PUB)
    adverts = {c: clients[c].advertise() for c in IDS}
    for a in adverts.values():
        server.receive_advertisement(a)
    directories = server.close_advertise()
    shares = {c: clients[c].share_keys(directories[c]) for c in IDS}
    for s in shares.values():
        server.receive_shares(s)
    requests = server.close_share_keys()
    inputs = {c: np.arange(4, dtype=np.uint32) for c in IDS}
    masked = {c: clients[c].masked_input(requests[c], inputs[c]) for c in IDS}
    for m in masked.values():
        server.receive_masked_input(m)
    unmask = server.close_masked_input()
    responses = {c: clients[c].unmask(unmask) for c in IDS}
    return {"Advertisement": adverts[LAST], "KeyDirectory": directories[LAST],
            "EncryptedShares": shares[LAST], "MaskedInputRequest": requests[LAST],
            "MaskedInput": masked[LAST], "UnmaskRequest": unmask,
            "UnmaskResponse": responses[LAST], "_all": (adverts, shares, masked, responses)}


SESSION = _session()
WIRE = {name: msg.to_wire() for name, msg in SESSION.items() if name != "_all"}
FIELD_NAMES = sorted({k for w in WIRE.values() for k in w})


def _value_ok(value: Any, kind: Any) -> bool:
    """The decoded field types the dataclasses promise."""
    if kind in ("bytes", bytes):
        return isinstance(value, bytes)
    if kind in ("str", str):
        return isinstance(value, str)
    return True


def _decoded_ok(name: str, msg: Any) -> None:
    cls = getattr(secagg, name)
    assert isinstance(msg, cls)
    for f in fields(cls):
        value = getattr(msg, f.name)
        if f.type in ("bytes", "str"):
            assert _value_ok(value, f.type), (f.name, value)
        elif f.name in ("survivors", "dropped"):
            assert isinstance(value, tuple) and all(isinstance(x, str) for x in value)
        elif f.name in ("ciphertexts", "self_mask_shares", "key_shares"):
            assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in value.items())
        elif f.name == "adverts":
            assert all(isinstance(a, secagg.Advertisement) for a in value)
        elif f.name == "vector":
            assert value.dtype == np.uint32


def _decode(name: str, data: Any) -> Any | None:
    try:
        msg = getattr(secagg, name).from_wire(data)
    except secagg.InvalidMessage as exc:
        assert str(exc)
        return None
    _decoded_ok(name, msg)
    return msg


_RANDOM = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), plain(), max_size=6),
    st.fixed_dictionaries({k: plain() for k in FIELD_NAMES}),
    plain(),
)


@pytest.mark.parametrize("name", sorted(WIRE))
def test_from_wire(name: str) -> None:
    """Random maps of the protocol's field names, random values, and real messages with
    one change each."""
    @fuzz
    @given(st.one_of(_RANDOM, tweak(WIRE[name])))
    def run(data: Any) -> None:
        count(f"secagg.{name}.from_wire")
        _decode(name, data)

    run()


# ---------------------------------------------------------------- receivers


def _server_at(stage: str) -> secagg.SecAggServer:
    """A server in `stage` that has heard every participant but the last one."""
    adverts, shares, masked, _responses = SESSION["_all"]
    server = secagg.SecAggServer(PARAMS, PUB)
    for c in IDS[:-1] if stage == "advertise" else IDS:
        server.receive_advertisement(adverts[c])
    if stage == "advertise":
        return server
    server.close_advertise()
    for c in IDS[:-1] if stage == "share" else IDS:
        server.receive_shares(shares[c])
    if stage == "share":
        return server
    server.close_share_keys()
    for c in IDS[:-1] if stage == "masked" else IDS:
        server.receive_masked_input(masked[c])
    if stage == "masked":
        return server
    server.close_masked_input()
    return server


def _server_state(server: secagg.SecAggServer) -> Any:
    return (server.stage, sorted(server._adverts), sorted(server._shares),
            sorted(server._masked_from), sorted(server._responses),
            None if server._sum is None else server._sum.tobytes())


SERVER_STAGES: dict[str, tuple[str, Callable[[secagg.SecAggServer, Any], None]]] = {
    "advertise": ("Advertisement", lambda s, m: s.receive_advertisement(m)),
    "share": ("EncryptedShares", lambda s, m: s.receive_shares(m)),
    "masked": ("MaskedInput", lambda s, m: s.receive_masked_input(m)),
    "unmask": ("UnmaskResponse", lambda s, m: s.receive_unmask(m)),
}


@pytest.mark.parametrize("stage", sorted(SERVER_STAGES))
def test_server_refuses_without_change(stage: str) -> None:
    name, receive = SERVER_STAGES[stage]
    server = [_server_at(stage)]

    @fuzz
    @given(tweak(WIRE[name]))
    def run(data: Any) -> None:
        count(f"secagg server {stage}")
        msg = _decode(name, data)
        if msg is None:
            return
        before = _server_state(server[0])
        try:
            receive(server[0], msg)
        except secagg.InvalidMessage:
            assert _server_state(server[0]) == before
            return
        server[0] = _server_at(stage)  # accepted: start the next case from the same point

    run()


def _client_at(stage: str) -> secagg.SecAggClient:
    """The last participant's client, ready for `stage`'s message from the server."""
    client = _clients()[LAST]
    client.advertise()
    if stage == "share":
        return client
    client.share_keys(SESSION["KeyDirectory"])
    if stage == "masked":
        return client
    client.masked_input(SESSION["MaskedInputRequest"], np.arange(4, dtype=np.uint32))
    return client


CLIENT_STAGES: dict[str, tuple[str, Callable[[secagg.SecAggClient, Any], Any]]] = {
    "share": ("KeyDirectory", lambda c, m: c.share_keys(m)),
    "masked": ("MaskedInputRequest",
               lambda c, m: c.masked_input(m, np.arange(4, dtype=np.uint32))),
    "unmask": ("UnmaskRequest", lambda c, m: c.unmask(m)),
}


@pytest.mark.parametrize("stage", sorted(CLIENT_STAGES))
def test_client_refuses_or_leaves(stage: str) -> None:
    """What the agent catches (InvalidMessage, ProtocolAbort) is all a client raises."""
    name, receive = CLIENT_STAGES[stage]
    client = [_client_at(stage)]

    @fuzz
    @given(tweak(WIRE[name]))
    def run(data: Any) -> None:
        count(f"secagg client {stage}")
        msg = _decode(name, data)
        if msg is None:
            return
        before = client[0].stage
        try:
            receive(client[0], msg)
        except secagg.InvalidMessage:
            assert client[0].stage == before
            return
        except secagg.ProtocolAbort:
            pass
        client[0] = _client_at(stage)

    run()
