"""Whether a party's TLS files make a connection the federation will accept.

A mutual-TLS handshake that fails reaches the caller as "unreachable", with the cause only
in the server's log. Checking the files first turns an expired certificate, one from
another CA, a key that is not the certificate's or a missing file into one line that names
the cause and the fix. Used by the operator CLI and the site agent before they dial.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID


def identity_problem(ca_path: Path, cert_path: Path, key_path: Path,
                     roles: tuple[str, ...] = (), now: dt.datetime | None = None) -> str | None:
    """Why these TLS files cannot make a connection the federation accepts, in one line
    with the fix, or None. What the TLS layer would only report as "unreachable": a file
    missing, a key that is not the certificate's, a certificate of another CA, expired or
    not yet valid, or of a role (`roles`) the caller cannot act in."""
    texts = {}
    for what, path in (("CA certificate", ca_path), ("certificate", cert_path),
                       ("private key", key_path)):
        try:
            texts[what] = path.read_bytes()
        except OSError as exc:
            return f"cannot read the {what} {path}: {exc.strerror or exc}"
    try:
        ca = x509.load_pem_x509_certificate(texts["CA certificate"])
    except ValueError:
        return f"{ca_path} is not a PEM certificate (expected the federation's ca.pem)"
    try:
        cert = x509.load_pem_x509_certificate(texts["certificate"])
    except ValueError:
        return f"{cert_path} is not a PEM certificate"
    try:
        key = serialization.load_pem_private_key(texts["private key"], None)
    except (ValueError, TypeError):
        return f"{key_path} is not an unencrypted PEM private key"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, public):
        return (f"the key {key_path} does not belong to the certificate {cert_path}; "
                "pass the key issued with it")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return (f"the certificate {cert_path} was not issued by the CA in {ca_path} "
                "(another federation's, or the wrong --ca)")
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return (f"the certificate {cert_path} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one "
                "(fedraft certs issue)")
    if now < cert.not_valid_before_utc:
        return (f"the certificate {cert_path} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    name, role = (", ".join(str(a.value) for a in cert.subject.get_attributes_for_oid(oid))
                  for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME))
    if roles and role not in roles:
        return (f"the certificate {cert_path} ({name!r}) has role {role or 'none'!r}; this "
                f"needs {' or '.join(repr(r) for r in roles)}")
    return None
