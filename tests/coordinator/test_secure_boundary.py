"""What crosses the leader's aggregation boundary in a secure round.

Real SecAgg+ clients (the site agent's code path: sparsify, encode, mask) talk through
msgpack to the leader's aggregation (`SecureSum` under `make_aggregation`). We record every message the leader
accepts: no masked vector is close to its site's encoded update, yet the unmasked
mean equals the plain weighted mean within the encoding's quantum.
"""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import wire
from coordinator.round.aggregation import AggregationAbort, make_aggregation
from privacy import secagg
from privacy.plan import encode_update, make_round_plan, sparsify_update

DIM = 2000


def _plan(sites, secure=True, compression=10.0):
    return make_round_plan(
        federation="f" * 64, round_number=3, attempt=1, term=7, seed=b"s" * 16,
        participants=sites, dim=DIM, last_global_change=np.linspace(-1, 1, DIM),
        compression=compression, clip=0.5, max_weight=1000.0, secure=secure)


def _through_wire(msg: dict) -> dict:
    return wire.unpack(wire.pack({"secagg": msg}))


def _submit(site: str, body: dict, stage: str = "advertise") -> wire.Submit:
    """A site's stage answer as the leader's API hands it on (after `Submit.from_wire`)."""
    return wire.Submit.from_wire({"site": site, "round": 3, "attempt": 1, "term": 7,
                                  "stage": stage, **body})


def _session(n=6, drop_at_masked=()):
    sites = [f"site-{i}" for i in range(n)]
    keys = {s: Ed25519PrivateKey.generate() for s in sites}
    pub = {s: wire.public_key_hex(k) for s, k in keys.items()}
    plan = _plan(sites)
    rng = np.random.default_rng(0)
    deltas = {s: rng.normal(0, 0.1, DIM) for s in sites}
    examples = {s: int(rng.integers(20, 200)) for s in sites}
    updates = {s: sparsify_update(deltas[s], None, plan, examples[s]) for s in sites}
    words = {s: encode_update(updates[s], plan, np.random.default_rng(i))
             for i, s in enumerate(sites)}
    clients = {s: secagg.SecAggClient(plan.secagg, s, keys[s],
                                      {k: bytes.fromhex(v) for k, v in pub.items()}, os.urandom)
               for s in sites}
    agg = make_aggregation(plan, pub)
    summed = agg.sum
    seen: list[tuple[str, str, dict]] = []
    while True:
        for s in sorted(summed.expected()):
            if summed.stage == "masked" and s in drop_at_masked:
                continue
            payload = summed.payload_for(s)
            c = clients[s]
            if summed.stage == "advertise":
                out = c.advertise().to_wire()
            elif summed.stage == "share":
                out = c.share_keys(secagg.KeyDirectory.from_wire(payload["directory"])).to_wire()
            elif summed.stage == "masked":
                req = secagg.MaskedInputRequest.from_wire(payload["request"])
                out = c.masked_input(req, words[s]).to_wire()
            else:
                out = c.unmask(secagg.UnmaskRequest.from_wire(payload["request"])).to_wire()
            body = _through_wire(out)
            seen.append((summed.stage, s, body))
            summed.accept(s, _submit(s, body, summed.stage))
        if summed.close_stage():
            return plan, agg, updates, words, seen


def test_leader_sees_only_masked_vectors_and_the_exact_sum():
    plan, agg, updates, words, seen = _session()
    masked = [(s, body["secagg"]) for stage, s, body in seen if stage == "masked"]
    assert len(masked) == 6
    for site, msg in masked:
        vec = secagg.MaskedInput.from_wire(msg).vector
        mine = words[site]
        # a masked vector is indistinguishable from uniform words: it matches the site's own
        # encoding in about 2^-32 of places and its top bits are balanced
        assert np.mean(vec == mine) < 0.01
        assert 0.35 < np.mean(vec >> 31) < 0.65  # 201 words: 4 sigma
        decoded, weight = plan.codec.decode(vec)
        assert abs(weight - updates[site].weight) > 1e-3 or not np.allclose(
            decoded, updates[site].values * updates[site].weight, atol=1e-3)
    # nothing else that crossed carries the update: other stages are keys and shares
    for stage, _, body in seen:
        if stage != "masked":
            assert "vector" not in body["secagg"]
    mean = agg.mean_delta()
    total_w = sum(u.weight for u in updates.values())
    expected = sum(u.values * u.weight for u in updates.values()) / total_w
    quantum = len(updates) / plan.codec.scale / total_w * 2
    np.testing.assert_allclose(mean[plan.indices], expected, atol=quantum)
    untouched = np.setdiff1d(np.arange(DIM), plan.indices)
    assert not mean[untouched].any()
    assert agg.sum.survivors() == sorted(updates)


def test_dropout_at_masked_input_still_sums_the_survivors():
    plan, agg, updates, words, _ = _session(n=8, drop_at_masked=("site-3",))
    survivors = agg.sum.survivors()
    assert "site-3" not in survivors and len(survivors) == 7
    total_w = sum(updates[s].weight for s in survivors)
    expected = sum(updates[s].values * updates[s].weight for s in survivors) / total_w
    np.testing.assert_allclose(agg.mean_delta()[plan.indices], expected, atol=1e-5)


def test_bad_messages_change_nothing():
    sites = ["a", "b", "c"]
    keys = {s: Ed25519PrivateKey.generate() for s in sites}
    pub = {s: wire.public_key_hex(k) for s, k in keys.items()}
    plan = _plan(sites)
    agg = make_aggregation(plan, pub).sum
    c = secagg.SecAggClient(plan.secagg, "a", keys["a"],
                            {k: bytes.fromhex(v) for k, v in pub.items()}, os.urandom)
    advert = _through_wire(c.advertise().to_wire())
    with pytest.raises(wire.WireError, match="names 'a'"):
        agg.accept("b", _submit("b", advert))  # b relays a's advert as its own
    with pytest.raises(wire.WireError):
        agg.accept("a", _submit("a", {"secagg": {"junk": 1}}))
    with pytest.raises(wire.WireError):
        agg.accept("a", _submit("a", {}))
    assert agg.answered == set()
    agg.accept("a", _submit("a", advert))
    with pytest.raises(wire.WireError):
        agg.accept("a", _submit("a", advert))  # duplicate
    assert agg.answered == {"a"}
    with pytest.raises(AggregationAbort):
        agg.close_stage()  # one advert is below the threshold


def test_plain_aggregation_checks_length_and_clip():
    plan = _plan(["a", "b"], secure=False)
    agg = make_aggregation(plan, {"a": "", "b": ""})
    ok = np.full(plan.k, 0.1, dtype=np.float32)

    def update(site: str, values: np.ndarray, n: int) -> wire.Submit:
        return _submit(site, {"update": wire.encode_update(values), "num_examples": n},
                       stage="collect")

    with pytest.raises(wire.WireError) as exc:
        agg.sum.accept("a", update("a", ok[:-1], 5))
    assert exc.value.code == "wrong_length"
    with pytest.raises(wire.WireError) as exc:
        agg.sum.accept("a", update("a", ok * 10, 5))
    assert exc.value.code == "out_of_range"
    agg.sum.accept("a", update("a", ok, 5))
    agg.sum.accept("b", update("b", -ok, 15))
    mean = agg.mean_delta()
    np.testing.assert_allclose(mean[plan.indices], (0.5 - 1.5) / 20, rtol=1e-6)
