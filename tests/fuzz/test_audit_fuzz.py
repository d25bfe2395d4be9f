"""Fuzz the audit log's readers: payload rules, entry and checkpoint parsing, and bundle
import with verification. Each returns its value or raises PayloadError / BundleError;
`verify` never raises on bad data, it reports it."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.audit import AuditSigner, AuditStore
from coordinator.audit.bundle import CHECKPOINTS_FILE, ENTRIES_FILE, MANIFEST_FILE, Bundle, BundleError
from coordinator.audit.entry import KNOWN_KINDS, Checkpoint, Entry, PayloadError, validate_payload
from tests.audit.conftest import build_log
from tests.fuzz.common import count, fuzz, mutated, tweak

JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(), st.text(max_size=16),
                        st.sampled_from(["0" * 64, "ab" * 32, "site-00", "add"]))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=16)


def _exported() -> tuple[Path, dict[str, str]]:
    """A small real log (genesis, enrolments, rounds with an abort and a retry), exported."""
    root = Path(tempfile.mkdtemp(prefix="fedraft-fuzz-audit-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    signer = AuditSigner.from_seed(b"\x07" * 32)
    store = AuditStore(f"sqlite:///{root / 'audit.db'}", signer=signer, checkpoint_every=4)
    try:
        build_log(store, rounds=4)
        store.export(root / "bundle")
    finally:
        store.close()
    files = {name: (root / "bundle" / name).read_text()
             for name in (ENTRIES_FILE, CHECKPOINTS_FILE, MANIFEST_FILE, "keys.json")}
    return root, files


ROOT, FILES = _exported()
ENTRIES = [json.loads(line) for line in FILES[ENTRIES_FILE].splitlines()]
PAYLOADS = {e["kind"]: e["payload"] for e in ENTRIES}
FIELDS = sorted({k for p in PAYLOADS.values() for k in p})


@fuzz
@given(st.one_of(st.sampled_from(sorted(KNOWN_KINDS)), st.text(max_size=12), JSON_LEAVES),
       st.one_of(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON,
                                 max_size=8), JSON))
def test_validate_payload_random(kind: Any, payload: Any) -> None:
    count("audit.validate_payload random")
    try:
        validate_payload(kind, payload)
    except PayloadError as exc:
        assert str(exc)


@fuzz
@given(st.sampled_from(sorted(PAYLOADS)).flatmap(
    lambda kind: st.tuples(st.just(kind), tweak(PAYLOADS[kind], JSON))))
def test_validate_payload_mutated(case: tuple[str, Any]) -> None:
    count("audit.validate_payload mutated")
    kind, payload = case
    try:
        validate_payload(kind, payload)
    except PayloadError as exc:
        assert str(exc)


@fuzz
@given(st.one_of(st.sampled_from(ENTRIES).flatmap(lambda e: tweak(e, JSON)), JSON))
def test_entry_and_checkpoint_from_dict(data: Any) -> None:
    count("audit Entry/Checkpoint.from_dict")
    for cls in (Entry, Checkpoint):
        try:
            cls.from_dict(data)
        except PayloadError as exc:
            assert str(exc)


@st.composite
def _bundle_files(draw: st.DrawFn) -> dict[str, str]:
    """The exported files with one of them changed: a line rewritten as JSON with one
    change, lines dropped, doubled or swapped, or the text itself mutated."""
    files = dict(FILES)
    name = draw(st.sampled_from(sorted(files)))
    lines = files[name].splitlines(keepends=True)
    how = draw(st.sampled_from(("line", "line", "whole", "order", "bytes", "json")))
    if name in (MANIFEST_FILE, "keys.json") and (how == "whole" or draw(st.booleans())):
        lines = [json.dumps(draw(tweak(json.loads(files[name]), JSON)))]
    elif how == "line" and lines:
        at = draw(st.integers(0, len(lines) - 1))
        try:
            lines[at] = json.dumps(draw(tweak(json.loads(lines[at]), JSON))) + "\n"
        except ValueError:
            lines[at] = draw(st.text(max_size=40)) + "\n"
    elif how == "order" and lines:
        at = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(("drop", "double", "swap")))
        if op == "drop":
            del lines[at]
        elif op == "double":
            lines.insert(at, lines[at])
        else:
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
    elif how == "bytes":
        raw = draw(mutated(files[name].encode()))
        lines = [raw.decode("utf-8", errors="surrogateescape")]
    elif how == "json":
        lines = [json.dumps(draw(JSON)) + "\n", "[" * draw(st.integers(0, 3000)) + "\n"]
    files[name] = "".join(lines)
    return files


@fuzz
@given(_bundle_files())
def test_bundle_import_and_verify(files: dict[str, str]) -> None:
    """An edited bundle opens (or is refused with BundleError) and verifies to a report."""
    count("audit Bundle import+verify")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))
        try:
            bundle = Bundle(tmp)
            report = bundle.verify()
        except BundleError as exc:
            assert str(exc)
            return
        assert isinstance(report.ok, bool)
        if files == FILES:
            assert report.ok


def test_unedited_bundle_verifies() -> None:
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name, text in FILES.items():
            (Path(tmp) / name).write_text(text)
        assert Bundle(tmp).verify().ok


@pytest.mark.parametrize("manifest", [{"files": [1]}, {"entries": "x"}, {"entries": -1},
                                      {"files": {"/etc/passwd": "0" * 64}}])
def test_bad_manifest_fields_are_refused(manifest: dict[str, Any]) -> None:
    """Found by the fuzzer: a list of files or a text count crashed `verify`."""
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name, body in FILES.items():
            (Path(tmp) / name).write_text(body)
        (Path(tmp) / MANIFEST_FILE).write_text(json.dumps(json.loads(FILES[MANIFEST_FILE])
                                                          | manifest))
        with pytest.raises(BundleError, match=MANIFEST_FILE):
            Bundle(tmp)


@pytest.mark.parametrize("text", ["[" * 5000, '{"a":' * 5000])
def test_deeply_nested_lines_are_reported_not_raised(text: str) -> None:
    """Found by the fuzzer: json.loads raises RecursionError, which is no ValueError."""
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name, body in FILES.items():
            (Path(tmp) / name).write_text(body)
        (Path(tmp) / ENTRIES_FILE).write_text(FILES[ENTRIES_FILE] + text + "\n")
        assert not Bundle(tmp).verify().ok
        (Path(tmp) / CHECKPOINTS_FILE).write_text(text + "\n")
        with pytest.raises(BundleError):
            Bundle(tmp).checkpoints()
        (Path(tmp) / MANIFEST_FILE).write_text(text)
        with pytest.raises(BundleError):
            Bundle(tmp)
