"""Ed25519 audit keys: the cluster's signing key and how public keys are named.

Ed25519 signatures are deterministic, so every node holding the cluster audit key writes
byte-identical entries for the same commands; nodes' logs can be compared hash for hash.

A public key travels as 64 lower-case hex digits (its 32 raw bytes); its ``key_id`` is the
first 16 hex digits of SHA-256 of those bytes. The id only labels which key an entry claims;
verification always checks the signature against the key the log's rotation chain puts in
force, never a key looked up by id.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ALGORITHM = "ed25519"


class AuditKeyError(ValueError):
    """A key that cannot be read, or a signer that the log does not expect."""


def key_id_for(public_key: bytes) -> str:
    """Short stable name of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise AuditKeyError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(public_key).hexdigest()[:16]


def parse_public_key(text: str | bytes) -> bytes:
    """Raw public key from hex, PEM (SubjectPublicKeyInfo) or raw bytes.

    Accepts what an operator is likely to paste on the command line or keep in a file.
    """
    if isinstance(text, bytes):
        if len(text) == 32:
            return text
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except ValueError as exc:
            raise AuditKeyError(f"unreadable PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise AuditKeyError("the PEM public key is not an Ed25519 key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise AuditKeyError("a public key must be 64 hex digits or a PEM block") from exc
    if len(raw) != 32:
        raise AuditKeyError("an Ed25519 public key is 32 bytes (64 hex digits)")
    return raw


def load_public_key(source: str | Path) -> bytes:
    """Raw public key from a value given on the command line: hex, or a path to hex/PEM."""
    path = Path(source)
    if isinstance(source, Path) or (len(str(source)) != 64 and path.exists()):
        return parse_public_key(path.read_text())
    return parse_public_key(str(source))


class AuditSigner:
    """The private half of an audit key; signs entry hashes and checkpoints."""

    __slots__ = ("_private", "public_key", "key_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id: str = key_id_for(self.public_key)

    @classmethod
    def generate(cls) -> AuditSigner:
        """A fresh random key (tests, or an operator creating the cluster key)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> AuditSigner:
        """Key from its 32-byte private seed."""
        if len(seed) != 32:
            raise AuditKeyError("an Ed25519 private seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_file(cls, path: str | Path, password: bytes | None = None) -> AuditSigner:
        """Key from a PKCS#8 PEM file, or a file holding the 64-hex-digit seed."""
        data = Path(path).read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            try:
                key = serialization.load_pem_private_key(data, password=password)
            except (ValueError, TypeError) as exc:
                raise AuditKeyError(f"unreadable private key {path}: {exc}") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise AuditKeyError(f"{path} does not hold an Ed25519 key")
            return cls(key)
        try:
            return cls.from_seed(bytes.fromhex(data.decode("ascii").strip()))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuditKeyError(f"{path}: expected PEM or a 64-hex-digit seed") from exc

    def save(self, path: str | Path, password: bytes | None = None) -> None:
        """Write the key as PKCS#8 PEM, readable only by its owner."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        target = Path(path)
        target.touch(mode=0o600, exist_ok=True)
        target.write_bytes(pem)

    @property
    def public_key_hex(self) -> str:
        """Public key as 64 hex digits, the form stored in genesis and rotation entries."""
        return self.public_key.hex()

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"AuditSigner(key_id={self.key_id!r})"


SignatureJob = tuple[bytes, bytes, bytes]  # (public key, signature, message)


def verify_batch(jobs: Sequence[SignatureJob]) -> list[bool]:
    """Check many signatures; module-level so that worker processes can run it."""
    checker = SignatureChecker()
    return [checker.check(*job) for job in jobs]


class SignatureChecker:
    """Verifies Ed25519 signatures, parsing each public key once.

    Ed25519 verification dominates the cost of verifying a log and holds the GIL, so
    ``prefetch`` can spread a known batch over worker processes; ``check`` then answers
    from those results and computes anything not prefetched itself.
    """

    __slots__ = ("_keys", "_known")

    def __init__(self) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        self._known: dict[SignatureJob, bool] = {}

    def prefetch(self, jobs: Sequence[SignatureJob], workers: int) -> None:
        """Verify ``jobs`` in ``workers`` processes and remember the answers."""
        if workers <= 1 or len(jobs) < 2 * workers:
            return
        chunk = -(-len(jobs) // (workers * 4))
        parts = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
        # fork starts in milliseconds but is unsafe once threads exist; spawn pays an
        # interpreter start and imports per worker.
        single_threaded = threading.active_count() == 1
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context(
            "fork" if single_threaded and "fork" in methods else "spawn"
        )
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for part, results in zip(parts, pool.map(verify_batch, parts), strict=True):
                self._known.update(zip(part, results, strict=True))

    def check(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is a valid signature of ``message`` by ``public_key``."""
        known = self._known.pop((public_key, signature, message), None)
        if known is not None:
            return known
        key = self._keys.get(public_key)
        if key is None:
            try:
                key = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                return False
            self._keys[public_key] = key
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True
