"""Enrollment bundles: everything a new site needs to join, in one file the operator sends.

The bundle is one JSON document (format `fedraft-site-bundle`, version 1) holding PEM
text: the federation CA certificate, the site's TLS certificate and key (issued here
for the site id with role `client`), the nodes' fleet endpoints, the site id, the
enrolled Ed25519 public key and, for information, the enrollment's privacy budget. JSON
rather than an archive because the site only parses text (no member paths to extract,
so no path traversal), the schema is checked key by key, and an operator can read what
is inside before sending it. It never holds the CA key or the site's identity private
key: the identity key is made at the site and only its public half travels.

The bundle does hold the site's TLS private key, so it is written 0600 and refuses to
overwrite; `fedraft-client import` (client/enroll.py) reads it on the site; the format's name,
version and fields are part of the wire schema (`coordinator.wire`), which both sides share.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.cluster import pki
from coordinator.wire import BUNDLE_FORMAT, BUNDLE_VERSION, HEX64, SITE_ID

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


class BundleError(ValueError):
    """The bundle cannot be made as asked (bad site id, key, endpoints or CA dir)."""


def ca_fingerprint(ca_pem: bytes) -> str:
    """sha256 of the CA certificate's DER bytes: what a site pins out of band."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_endpoints(value: str | list[str]) -> list[str]:
    """host:port fleet endpoints a site can dial; bind-all addresses are refused because
    a node's own config may list 0.0.0.0, which means nothing on the site's side."""
    items = [e.strip() for e in value.split(",")] if isinstance(value, str) else list(value)
    items = [e for e in items if e]
    if not items:
        raise BundleError("no fleet endpoints (give --fleet host:port[,host:port])")
    for e in items:
        host, sep, port = e.rpartition(":")
        if not sep or not host or any(c.isspace() for c in host) or not port.isdigit() \
                or not 0 < int(port) < 65536:
            raise BundleError(f"fleet endpoint {e!r} is not host:port")
        if host in WILDCARD_HOSTS:
            raise BundleError(f"fleet endpoint {e!r} is a bind-all address; give the address "
                              "sites dial with --fleet host:port[,host:port]")
    return items


def fleet_from_status(status: dict[str, Any]) -> list[str]:
    """The fleet endpoints of every node, from an admin `Status` reply; a member whose
    endpoint the cluster has not recorded makes the caller name them (--fleet)."""
    nodes = status.get("nodes", [])
    unknown = [str(n.get("id")) for n in nodes if not n.get("fleet")]
    if unknown:
        raise BundleError(f"the cluster does not know the fleet endpoint of {', '.join(unknown)}; "
                          "give --fleet host:port[,host:port]")
    return parse_endpoints([str(n["fleet"]) for n in nodes])


def check_public_key(public_key: str) -> str:
    """Lowercase hex of a 32-byte Ed25519 public key, or BundleError."""
    key = public_key.strip().lower()
    if not HEX64.fullmatch(key):
        raise BundleError("public key must be 64 hex characters (fedraft-client keygen prints it)")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))
    except ValueError:
        raise BundleError("public key is not a valid Ed25519 key") from None
    return key


def check_ca_dir(ca_dir: Path) -> None:
    """Fail before anything is enrolled when the CA directory cannot issue."""
    for name in ("ca.pem", "ca.key"):
        if not (ca_dir / name).is_file():
            raise BundleError(f"{ca_dir / name} not found (--ca-dir must hold ca.pem and ca.key)")


def build_bundle(ca_dir: Path, site: str, public_key: str, nodes: list[str], epsilon: float,
                 delta: float, days: int = 365) -> dict[str, Any]:
    """Issue the site's TLS certificate and assemble the bundle (nothing written but a
    private temporary directory that is removed)."""
    if not SITE_ID.fullmatch(site):
        raise BundleError(f"bad site id {site!r}")
    key = check_public_key(public_key)
    nodes = parse_endpoints(nodes)
    check_ca_dir(ca_dir)
    with tempfile.TemporaryDirectory(prefix="fedraft-bundle-") as tmp:
        ident = pki.issue(ca_dir, Path(tmp), "client", site, days=days)
        cert_pem, key_pem = ident.cert.read_bytes(), ident.key.read_bytes()
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "site": site, "public_key": key,
        "nodes": nodes, "ca_pem": ca_pem.decode(), "cert_pem": cert_pem.decode(),
        "key_pem": key_pem.decode(), "budget": {"epsilon": float(epsilon), "delta": float(delta)},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_bundle(path: Path, bundle: dict[str, Any]) -> None:
    """Write with mode 0600 and never over an existing file: it holds a private key."""
    data = (json.dumps(bundle, indent=2, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def check_bundle_target(path: Path) -> None:
    """Fail before enrolling when the bundle could not be written afterwards."""
    if path.exists():
        raise BundleError(f"{path} exists; refusing to overwrite a bundle (it holds a key)")
    if not path.parent.is_dir():
        raise BundleError(f"directory {path.parent} does not exist")
