"""Canonical JSON encoding: the exact bytes that audit hashes and signatures cover.

Why a canonical form: every node writes its own copy of the audit log, the log is stored in
SQLite or PostgreSQL and exported as JSON lines, and an auditor re-derives every hash from the
decoded values. All of that only works if one JSON value has exactly one byte encoding.

The encoding (version 1), precisely:

* RFC 8259 JSON text, UTF-8, no byte order mark, no insignificant whitespace
  (separators ``,`` and ``:``).
* Object keys are strings, unique, sorted by Unicode code point.
* Strings: only ``"``, ``\\`` and U+0000..U+001F are escaped (``\\"``, ``\\\\``, ``\\b``,
  ``\\f``, ``\\n``, ``\\r``, ``\\t``, otherwise ``\\u00xx`` with lower-case hex); every other
  character, U+007F and non-ASCII included, is written as itself in UTF-8. Lone surrogates
  are rejected.
* ``true``, ``false``, ``null``.
* Integers (booleans excluded) in plain decimal, within the signed 64-bit range.
* Floats (IEEE-754 binary64) in the shortest decimal form that reads back to the same
  double, spelled as Python's ``repr`` spells it: ``0.1``, ``2.0``, ``1e-05``, ``1e+16``,
  ``-0.0``. An integral float keeps its ``.0``, so ``1`` and ``1.0`` encode differently,
  and both survive a JSON round trip unchanged. NaN and infinities are rejected.

Python's shortest-repr algorithm has been the same on every platform since 3.1, and the
stores keep the canonical text verbatim in a TEXT column (never JSON/JSONB, which would
reorder keys or respell numbers), so a hash is stable across Python versions and across
SQLite and PostgreSQL round trips. This is RFC 8785 (JCS) except for the spelling of floats
and for the order of keys that contain characters beyond U+FFFF.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

from coordinator.wire.schema import HEX64

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

_ENCODER = json.JSONEncoder(
    ensure_ascii=False,
    allow_nan=False,
    sort_keys=True,
    separators=(",", ":"),
    check_circular=False,
)


class CanonicalError(ValueError):
    """A value that has no canonical encoding (NaN, non-string key, lone surrogate, ...)."""


def normalize(value: Any, *, _path: str = "$") -> JSONValue:
    """Return a plain-JSON copy of ``value``, or raise CanonicalError naming the bad part.

    Writers call this once before hashing, so numpy scalars, tuples and other mappings are
    turned into the plain types that a JSON decoder gives back, and anything that would not
    survive a round trip unchanged is refused up front rather than discovered by an auditor.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_text(value, _path)
        return str(value)
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise CanonicalError(f"{_path}: integer {number} is outside the signed 64-bit range")
        return number
    if isinstance(value, numbers.Real):
        real = float(value)
        if not math.isfinite(real):
            raise CanonicalError(f"{_path}: {real!r} is not a finite number")
        return real
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{_path}: object key {key!r} is not a string")
            _check_text(key, _path)
            out[str(key)] = normalize(item, _path=f"{_path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [normalize(item, _path=f"{_path}[{i}]") for i, item in enumerate(value)]
    raise CanonicalError(f"{_path}: {type(value).__name__} is not JSON-compatible")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalError(f"{path}: string holds a lone surrogate") from exc


def canonical_text(value: Any) -> str:
    """Canonical JSON text of an already plain JSON value (as json.loads returns it)."""
    try:
        return _ENCODER.encode(value)
    except (ValueError, TypeError) as exc:
        raise CanonicalError(str(exc)) from exc


def canonical_bytes(value: Any) -> bytes:
    """Canonical UTF-8 bytes of an already plain JSON value: what the hashes cover."""
    try:
        return canonical_text(value).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalError("string holds a lone surrogate") from exc


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the spelling used for every hash in the audit log."""
    return hashlib.sha256(data).hexdigest()




def is_sha256_hex(text: object) -> bool:
    """True for 64 lower-case hex digits, the only accepted spelling of a hash."""
    return isinstance(text, str) and HEX64.fullmatch(text) is not None
