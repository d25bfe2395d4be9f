"""Fuzz the site's enrollment-bundle import: parsing and the certificate checks after it
either return the bundle (and the CA fingerprint) or raise BundleError, nothing else."""

from __future__ import annotations

import base64
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from client.enroll import BundleError, SiteBundle, parse_bundle, verify_bundle
from coordinator import wire
from coordinator.cluster import pki
from coordinator.ops.enroll import build_bundle
from tests.fuzz.common import count, fuzz, mutated, tweak

IDENTITY = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


def _valid() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedraft-fuzz-ca-") as tmp:
        pki.init_ca(Path(tmp))
        return build_bundle(Path(tmp), "hospital-a", wire.public_key_hex(IDENTITY),
                            ["coord1.example.org:7200", "10.0.0.12:7200"], 3.0, 1e-5)


VALID = _valid()
PEM_FIELDS = ("ca_pem", "cert_pem", "key_pem")
_PEM = re.compile(r"(-----BEGIN [A-Z ]+-----\n)(.*?)(\n-----END [A-Z ]+-----)", re.S)


@st.composite
def _pem_edit(draw: st.DrawFn) -> dict[str, Any]:
    """A bundle whose certificate or key has its DER bytes edited (still valid PEM
    armour), so the X.509 and key parsers are reached."""
    out = dict(VALID)
    name = draw(st.sampled_from(PEM_FIELDS))
    m = _PEM.search(out[name])
    assert m is not None
    der = draw(mutated(base64.b64decode(m.group(2))))
    body = "\n".join(re.findall(".{1,64}", base64.b64encode(der).decode())) or "AA=="
    out[name] = out[name][:m.start()] + m.group(1) + body + m.group(3) + out[name][m.end():]
    if draw(st.booleans()):  # another valid PEM in its place: a CA as the site's cert, ...
        out[name] = VALID[draw(st.sampled_from(PEM_FIELDS))]
    return out


_DOCS = st.one_of(
    st.binary(max_size=256),
    JSON.map(lambda v: json.dumps(v).encode()),
    tweak(VALID, JSON).map(lambda v: json.dumps(v).encode()),
    _pem_edit().map(lambda v: json.dumps(v).encode()),
    st.integers(0, 200_000).map(lambda n: b"[" * n),
)


def _checked(data: bytes) -> SiteBundle | None:
    try:
        bundle = parse_bundle(data)
    except BundleError as exc:
        assert str(exc)
        return None
    assert isinstance(bundle, SiteBundle)
    try:
        fingerprint = verify_bundle(bundle, IDENTITY)
    except BundleError as exc:
        assert str(exc)
        return bundle
    assert re.fullmatch("[0-9a-f]{64}", fingerprint)
    return bundle


@fuzz
@given(_DOCS)
def test_parse_and_verify_bundle(data: bytes) -> None:
    count("client.enroll parse+verify")
    _checked(data)


def test_valid_bundle_passes_and_found_cases_are_refused() -> None:
    assert _checked(json.dumps(VALID).encode()) is not None
    for bad in (b"[" * 100_000,  # json.loads: RecursionError
                json.dumps(VALID | {"budget": {"epsilon": 1e400, "delta": 1e-5}}).encode(),
                json.dumps(VALID).replace('"epsilon": 3.0', '"epsilon": ' + "9" * 400).encode(),
                json.dumps(VALID | {"budget": {"epsilon": -1.0, "delta": 1e-5}}).encode()):
        try:
            parse_bundle(bad)
        except BundleError:
            continue
        raise AssertionError(f"accepted {bad[:60]!r}")
