"""A federation CA and the certificates that bind each party to a role.

Every connection is mutual TLS. The role of a certificate (node, client, operator,
auditor) is its subject's organizational unit, signed by the federation CA, so an API
can authorise a caller from the handshake alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator import durable, wire

ROLES = ("node", "client", "operator", "auditor")


@dataclass(frozen=True)
class Identity:
    """Paths of one party's TLS material."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(directory: Path, name: str = "fedraft federation CA", days: int = 3650) -> Path:
    """Create ca.pem and ca.key in `directory`; refuses to overwrite an existing CA."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"a CA already exists in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    durable.write_atomic(key_path, _key_pem(key), mode=0o600)
    durable.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path


def issue(
    ca_dir: Path,
    out_dir: Path,
    role: str,
    name: str,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = 365,
) -> Identity:
    """Issue `name`.pem/.key for `role`, with `hosts` as DNS or IP subject alt names.

    Refuses (FileExistsError, nothing written) to replace an existing key or certificate:
    an `--out` pointing at the CA's own directory must not overwrite the CA."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not wire.SITE_ID.fullmatch(name):
        raise ValueError(f"name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit (it names the key file)")
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    for existing in (key_path, cert_path):
        if existing.exists():
            raise FileExistsError(f"{existing} exists; refusing to overwrite a key or "
                                  "certificate (remove it first, or issue into another --out)")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            ])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    durable.write_atomic(key_path, _key_pem(key), mode=0o600)
    return Identity(ca=ca_dir / "ca.pem", cert=cert_path, key=key_path)


@lru_cache(maxsize=1024)
def subject_of(cert_pem: bytes) -> tuple[str, str]:
    """(common name, role) of a PEM certificate; role is '' when it has none."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")
