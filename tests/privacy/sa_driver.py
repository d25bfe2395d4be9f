"""In-process driver for SecAgg+ sessions used by the privacy tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg import (
    AggregateResult,
    ProtocolAbort,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    make_context,
)


def det_rng(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic os.urandom stand-in (SHA-256 in counter mode) for reproducible tests."""
    counter = 0

    def rng(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]

    return rng


def identities(ids: Iterable[str], seed: bytes = b"id") -> dict[str, Ed25519PrivateKey]:
    """Deterministic Ed25519 identity keys per site."""
    return {
        cid: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed + cid.encode()).digest())
        for cid in ids
    }


def make_params(
    n: int,
    vector_len: int,
    threshold: int | None = None,
    degree: int | None = None,
    round_number: int = 1,
) -> SecAggParams:
    """Parameters for n clients named c00, c01, ..."""
    from privacy.secagg import default_degree, default_threshold

    ids = tuple(f"c{i:02d}" for i in range(n))
    deg = default_degree(n) if degree is None else degree
    t = default_threshold(deg) if threshold is None else threshold
    return SecAggParams(
        context=make_context("fed-test", round_number, 0, 1),
        participants=ids,
        vector_len=vector_len,
        threshold=t,
        graph_seed=b"graph-seed",
        degree=deg,
    )


def run_session(
    params: SecAggParams,
    inputs: dict[str, np.ndarray],
    drop_before_shares: Iterable[str] = (),
    drop_before_masked: Iterable[str] = (),
    drop_before_unmask: Iterable[str] = (),
    seed: bytes = b"session",
    skip_advertise: Iterable[str] = (),
) -> AggregateResult:
    """Run all four stages in memory; clients in the drop sets stop responding there."""
    keys = identities(params.participants)
    pub = {cid: k.public_key() for cid, k in keys.items()}
    server = SecAggServer(params, pub)
    clients = {
        cid: SecAggClient(params, cid, keys[cid], pub, det_rng(seed + cid.encode()))
        for cid in params.participants
    }
    alive = set(params.participants) - set(skip_advertise)
    for cid in sorted(alive):
        server.receive_advertisement(clients[cid].advertise())
    directories = server.close_advertise()
    alive -= set(drop_before_shares)
    for cid in sorted(alive & directories.keys()):
        try:
            msg = clients[cid].share_keys(directories[cid])
        except ProtocolAbort:  # too few advertised neighbours: the client stops
            continue
        server.receive_shares(msg)
    requests = server.close_share_keys()
    alive -= set(drop_before_masked)
    for cid in sorted(alive & requests.keys()):
        try:
            masked = clients[cid].masked_input(requests[cid], inputs[cid])
        except ProtocolAbort:  # too few neighbours in U1: the client stops
            continue
        server.receive_masked_input(masked)
    unmask = server.close_masked_input()
    alive -= set(drop_before_unmask)
    for cid in sorted(alive & set(server.unmask_recipients)):
        server.receive_unmask(clients[cid].unmask(unmask))
    return server.finish()
