"""Import an enrollment bundle into a ready site directory (`fedraft-client import`).

The operator's `fedraft client enroll --bundle` (coordinator/ops/enroll.py) writes one JSON
document; this module checks everything in it before writing a byte: the site
certificate chains to the bundle's CA and names the site with role `client`, the TLS key
matches it, and the identity key the site holds is the one that was enrolled. A bundle
that fails any check is refused whole, so a half-imported site never exists. The format
(`BUNDLE_FORMAT`, `BUNDLE_VERSION`, `BUNDLE_FIELDS`) and the site id are the wire
schema's, the one part of the coordinator the site imports, so both ends read them from
one place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from client.config import SiteConfig, SiteConfigError, load_site_config
from client.store import fsync_dir, write_atomic
from coordinator import wire

MAX_BUNDLE_BYTES = 1 << 20


class BundleError(ValueError):
    """A bundle or identity key refused on import; nothing was written."""


@dataclass(frozen=True)
class SiteBundle:
    site: str
    public_key: str
    nodes: tuple[str, ...]
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    budget: dict[str, float]
    created: str


@dataclass(frozen=True)
class Imported:
    """What `import_bundle` wrote, and the loaded config that proves site.toml is usable."""

    config_path: Path
    files: tuple[Path, ...]
    config: SiteConfig
    bundle: SiteBundle
    ca_sha256: str


def parse_bundle(data: bytes) -> SiteBundle:
    """Check the bundle's shape (every field, no others: a CA key has nowhere to hide)."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError("bundle is larger than 1 MiB; not a fedraft site bundle")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle is not JSON: {exc}") from None
    except RecursionError:  # json nests by recursion: "[[[[..." is no bundle
        raise BundleError("bundle is not JSON: nested too deeply") from None
    if not isinstance(raw, dict) or raw.get("format") != wire.BUNDLE_FORMAT:
        raise BundleError(f"not a fedraft site bundle (format must be {wire.BUNDLE_FORMAT!r})")
    if raw.get("version") != wire.BUNDLE_VERSION:
        raise BundleError(f"bundle version {raw.get('version')!r} is not supported "
                          f"(want {wire.BUNDLE_VERSION})")
    for name, kind in wire.BUNDLE_FIELDS.items():
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise BundleError(f"bundle field {name!r}: missing or not a {kind.__name__}")
    extra = sorted(set(raw) - set(wire.BUNDLE_FIELDS))
    if extra:
        raise BundleError(f"bundle has unexpected fields: {', '.join(extra)}")
    if not wire.SITE_ID.match(raw["site"]):
        raise BundleError(f"bundle site id {raw['site']!r} is not a valid site id")
    if not wire.HEX64.fullmatch(raw["public_key"]):
        raise BundleError("bundle public_key must be 64 lowercase hex characters")
    nodes = raw["nodes"]
    if not nodes or not all(isinstance(n, str) and re.fullmatch(r"[^\s:]+:\d{1,5}|\[[^\]\s]+\]:\d{1,5}",
                                                                  n) for n in nodes):
        raise BundleError("bundle nodes must be a non-empty list of host:port endpoints")
    budget = raw["budget"]
    if set(budget) != {"epsilon", "delta"} or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in budget.values()):
        raise BundleError("bundle budget must be {epsilon, delta} numbers")
    try:  # a 400-digit integer does not fit a float; 1e400 reads as infinity
        eps, delta = float(budget["epsilon"]), float(budget["delta"])
    except OverflowError:
        raise BundleError("bundle budget numbers are out of range") from None
    if not (0 < eps < math.inf and 0 < delta < 1):
        raise BundleError("bundle budget needs epsilon > 0 (finite) and delta in (0, 1)")
    return SiteBundle(raw["site"], raw["public_key"], tuple(nodes), raw["ca_pem"].encode(),
                      raw["cert_pem"].encode(), raw["key_pem"].encode(),
                      {"epsilon": eps, "delta": delta}, raw["created"])


def _der_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _public_raw(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_bundle(bundle: SiteBundle, identity_key: Ed25519PrivateKey,
                  ca_sha256: str | None = None, now: dt.datetime | None = None) -> str:
    """Refuse a bundle whose certificate does not chain to its CA, names another site or
    role, is out of date or does not match its key; or an identity key that is not the
    enrolled one. Returns the CA's sha256 fingerprint."""
    try:
        return _verify_bundle(bundle, identity_key, ca_sha256, now)
    except BundleError:
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion,
            x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # cryptography parses extensions and names lazily: a damaged one fails on access
        raise BundleError(f"bundle certificate or key is malformed: {exc!r}") from None


def _verify_bundle(bundle: SiteBundle, identity_key: Ed25519PrivateKey,
                   ca_sha256: str | None, now: dt.datetime | None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_pem)
        cert = x509.load_pem_x509_certificate(bundle.cert_pem)
    except ValueError as exc:
        raise BundleError(f"bundle certificate is not PEM: {exc}") from None
    fingerprint = _der_sha256(ca)
    if ca_sha256 is not None and fingerprint != ca_sha256.strip().lower().replace(":", ""):
        raise BundleError(f"bundle CA fingerprint {fingerprint} is not the pinned one")
    try:
        ca_is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca_is_ca = False
    if not ca_is_ca:
        raise BundleError("bundle ca_pem is not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise BundleError("the site certificate does not chain to the bundle's CA") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BundleError(f"the site certificate is not valid now (valid "
                          f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    cn = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ou = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if cn != [bundle.site]:
        raise BundleError(f"the site certificate names {', '.join(cn) or 'no one'}, "
                          f"not site {bundle.site!r}")
    if ou != ["client"]:
        raise BundleError(f"the site certificate's role is {', '.join(ou) or 'none'}, not client")
    try:
        tls_key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"bundle key_pem is not an unencrypted private key: {exc}") from None
    if _public_raw(tls_key.public_key()) != _public_raw(cert.public_key()):
        raise BundleError("bundle key_pem does not belong to the site certificate")
    enrolled = identity_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw).hex()
    if enrolled != bundle.public_key:
        raise BundleError(f"the identity key's public key {enrolled[:16]}… is not the one "
                          f"enrolled for {bundle.site} ({bundle.public_key[:16]}…)")
    return fingerprint


def read_identity_key(path: Path) -> Ed25519PrivateKey:
    """The site's Ed25519 identity key (`fedraft-client keygen`), or BundleError."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"cannot read identity key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BundleError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is not an Ed25519 private key")
    return key


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def render_site_toml(bundle: SiteBundle, identity_key: str, task: str | None,
                     flower_app: str | None, partition: int, num_partitions: int,
                     app_dir: str | None = None) -> str:
    """site.toml for client/config.py, TLS paths relative to the file's own directory. The
    [data] shard is written for a Flower app too: it becomes the app's node_config
    (``partition-id``, ``num-partitions``), so each site trains on its own share."""
    nodes = ", ".join(_toml_str(n) for n in bundle.nodes)
    b = bundle.budget
    lines = [
        f"# imported from an enrollment bundle made {bundle.created}",
        f"# the federation's privacy budget for this site: epsilon {b['epsilon']:g}, "
        f"delta {b['delta']:g}",
        "# (add a [privacy] section to train with DP-SGD under a budget of the site's own)",
        "[site]", f"id = {_toml_str(bundle.site)}", f"nodes = [{nodes}]",
        'state_dir = "state"', f"identity_key = {_toml_str(identity_key)}", "",
        "[tls]", 'ca = "ca.pem"', f"cert = {_toml_str(bundle.site + '.pem')}",
        f"key = {_toml_str(bundle.site + '.key')}", "", "[task]",
        f"name = {_toml_str(task)}" if task else f"flower_app = {_toml_str(flower_app or '')}",
        *([f"app_dir = {_toml_str(app_dir)}"] if app_dir else []),
        'device = "auto"', "",
        "[data]", f"partition = {partition}", f"num_partitions = {num_partitions}", "",
    ]
    return "\n".join(lines)


def _check_app(app_ref: str, app_dir: str | None) -> tuple[str, str | None]:
    """Refuse, before writing anything, a Flower app the agent could not load; return the
    reference and app directory as site.toml keeps them (directories made absolute, so
    the agent finds them wherever it starts)."""
    from client.training.flower_app import FlowerAppError, load_client_app

    try:
        load_client_app(app_ref, app_dir)
    except FlowerAppError as exc:
        raise BundleError(str(exc)) from None
    if Path(app_ref).expanduser().is_dir():
        app_ref = str(Path(app_ref).expanduser().resolve())
    return app_ref, str(Path(app_dir).expanduser().resolve()) if app_dir is not None else None


def import_bundle(bundle_path: Path, identity_key_path: Path, directory: Path,
                  task: str | None = None, flower_app: str | None = None, partition: int = 0,
                  num_partitions: int = 1, ca_sha256: str | None = None,
                  force: bool = False, app_dir: str | None = None) -> Imported:
    """Check the bundle and identity key, then write ca.pem, SITE.pem, SITE.key (0600) and
    site.toml into `directory` all together; any refusal leaves the disk as it was."""
    if (task is None) == (flower_app is None):
        raise BundleError("give exactly one of --task and --flower-app")
    if app_dir is not None and flower_app is None:
        raise BundleError("--app-dir goes with --flower-app")
    if partition < 0 or num_partitions < 1 or partition >= num_partitions:
        raise BundleError("need 0 <= --partition < --num-partitions")
    if flower_app is not None:
        flower_app, app_dir = _check_app(flower_app, app_dir)
    try:
        data = Path(bundle_path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bundle_path}: {exc.strerror or exc}") from None
    bundle = parse_bundle(data)
    key = read_identity_key(identity_key_path)
    fingerprint = verify_bundle(bundle, key, ca_sha256)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} exists and is not a directory")
    key_abs = Path(identity_key_path).resolve()
    dir_abs = directory.resolve()
    identity = str(key_abs.relative_to(dir_abs)) if key_abs.is_relative_to(dir_abs) else str(key_abs)
    outputs = {
        "ca.pem": (bundle.ca_pem, 0o644),
        f"{bundle.site}.pem": (bundle.cert_pem, 0o644),
        f"{bundle.site}.key": (bundle.key_pem, 0o600),
        "site.toml": (render_site_toml(bundle, identity, task, flower_app, partition,
                                       num_partitions, app_dir).encode(), 0o644),
    }
    existing = [name for name in outputs if (directory / name).exists()]
    if existing and not force:
        raise BundleError(f"{', '.join(existing)} already in {directory}; --force replaces them")
    created = next((d for d in (*reversed(dir_abs.parents), dir_abs) if not d.exists()), None)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fedraft-import-", dir=directory))
    try:
        for name, (blob, mode) in outputs.items():  # mode exactly: the umask may narrow it
            write_atomic(staging / name, blob, mode=mode, exclusive=True)
        try:
            load_site_config(staging / "site.toml")
        except SiteConfigError as exc:
            raise BundleError(f"the written site.toml does not load: {exc}") from None
        if "site.toml" in existing:  # keep the site's own edits ([privacy], data) at hand
            shutil.copy2(directory / "site.toml", directory / "site.toml.bak")
        for name in outputs:  # same directory: each rename is atomic
            os.replace(staging / name, directory / name)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    config_path = directory / "site.toml"
    return Imported(config_path, tuple(directory / n for n in outputs),
                    load_site_config(config_path), bundle, fingerprint)
