"""Shared settings and value strategies of the fuzz tests.

Why one place: CI runs a few dozen cases per decoder (the whole suite in seconds), while
`FEDRAFT_FUZZ_EXAMPLES=10000` turns every target into a long run; each target counts the
cases it ran so the long run can report its figures (see conftest.py).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

DEFAULT_EXAMPLES = 25
EXAMPLES = int(os.environ.get("FEDRAFT_FUZZ_EXAMPLES") or DEFAULT_EXAMPLES)

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # a long run should not leave thousands of examples on disk
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)

CASES: Counter[str] = Counter()
"""Cases run per target in this session: what the long mode reports."""


def count(target: str) -> None:
    CASES[target] += 1


# ---------------------------------------------------------------- values

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24), st.binary(max_size=48),
)
"""What a msgpack map can carry, small ints and edge floats included."""


def plain(leaves: st.SearchStrategy[Any] = scalars, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Nested lists and string-keyed maps of `leaves`."""
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=max_leaves)


def hostile() -> st.SearchStrategy[Any]:
    """Values msgpack can encode that are not part of our schema: extension types,
    timestamps, byte keys, deep nesting, alongside plain ones."""
    odd = st.one_of(
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
        st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)),
        st.integers(1, 200).map(_nested),
    )
    leaves = st.one_of(scalars, odd)
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), inner,
                        max_size=4)), max_leaves=12)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def is_plain(value: Any, depth: int = 0) -> bool:
    """Only msgpack's plain types, maps keyed by strings."""
    if isinstance(value, str | bytes | bool | int | float) or value is None:
        return True
    if isinstance(value, list):
        return all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v, depth + 1) for k, v in value.items())
    return False


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few random byte edits: flips, inserts, deletes, truncation, splices."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate", "splice")))
        at = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and out:
            del out[at:at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[at:]
        elif op == "splice":
            out[at:at + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
    return bytes(out)


@st.composite
def tweak(draw: st.DrawFn, value: Any, fill: st.SearchStrategy[Any] | None = None,
          depth: int = 0) -> Any:
    """`value` (a decoded message) with one random change somewhere inside it: a field
    dropped, added, renamed or replaced, a list element dropped or doubled, bytes edited,
    a string swapped; the structure around the change is kept, so decoders get past
    their first checks. New values come from `fill` (default: any msgpack value)."""
    fill = plain() if fill is None else fill
    if isinstance(value, dict) and value and depth < 6:
        out = dict(value)
        key = draw(st.sampled_from(sorted(out)))
        op = draw(st.sampled_from(("inner", "inner", "inner", "drop", "add", "replace")))
        if op == "inner":
            out[key] = draw(tweak(out[key], fill, depth + 1))
        elif op == "drop":
            del out[key]
        elif op == "add":
            out[draw(st.text(max_size=10))] = draw(fill)
        else:
            out[key] = draw(fill)
        return out
    if isinstance(value, list) and value and depth < 6:
        out_list = list(value)
        at = draw(st.integers(0, len(out_list) - 1))
        op = draw(st.sampled_from(("inner", "drop", "double", "replace")))
        if op == "inner":
            out_list[at] = draw(tweak(out_list[at], fill, depth + 1))
        elif op == "drop":
            del out_list[at]
        elif op == "double":
            out_list.insert(at, out_list[at])
        else:
            out_list[at] = draw(fill)
        return out_list
    if isinstance(value, bytes) and draw(st.booleans()):
        return draw(mutated(value))
    if isinstance(value, str) and draw(st.booleans()):
        return draw(st.sampled_from((value + "x", value[:-1], value.upper(), "", "c0" + value[-1:])))
    return draw(fill)
