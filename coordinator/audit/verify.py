"""Offline verification of an audit log (pure: no database, no network).

Input is what any copy of the log holds: entries in storage order, the signed checkpoints,
optionally a public key pinned out of band, a blob directory and a DP accountant. Checks:

1. chain: seq runs 0, 1, 2, ... with no gap; each ``prev_hash`` is the previous entry's
   hash; each ``entry_hash`` is recomputed from the canonical encoding; raft indexes rise;
2. signatures: each entry is signed by the key in force at its seq, starting from the key in
   the genesis entry (or the pinned key) and following ``key_rotation`` entries, each signed
   by the key it replaces;
3. checkpoints: each signed Merkle root is recomputed over the first ``tree_size`` entry
   hashes and its signature checked; a log shorter than a checkpoint has lost its tail;
4. blobs (optional): every model version named by ``model_genesis``/``round_committed``
   is rehashed from the blob directory;
5. privacy charges (optional): the log is walked in order keeping each site's history of
   DP runs, and every recorded ``epsilon_total`` and ``epsilon`` (the increase) is
   recomputed with the caller's accountant over that history (see ``charges``), and held
   against the site's budget;
6. lineage: each committed version's parent is the version committed before it, and no
   round is committed twice (the "one version per round, one hash chain" invariant).

Checks 4 and 6 are ``lineage``'s, check 5 is ``charges``'; ``verify_log`` walks the log
once and hands each entry to them.

Checking goes on past a failure, linking each entry to its predecessor's stored hash, so the
report lists every damaged entry and names the first. An edit of a payload, a deleted,
swapped or reordered row, a truncated tail below a checkpoint, a foreign signature and a
replaced blob each make ``first_bad_seq`` the seq of the first affected entry.

Without a pinned genesis key the log only proves it is internally consistent: whoever can
rewrite the whole database could also have made a new key. Pin the key (from the cluster's
configuration or an earlier export) to rule that out. A ``trusted_head`` (the signed audit
head the cluster commits through Raft, so no single database holds the only copy) pins the
signer too, by its key id, and catches a tail cut short however many checkpoint rows were
deleted with it; ``signer_pinned`` says whether either pinned it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordinator.audit import heads
from coordinator.audit.canonical import CanonicalError, is_sha256_hex
from coordinator.audit.charges import Accountant, ChargeChecker
from coordinator.audit.entry import (
    BUDGET_CHANGED,
    CHARGE_RECORDED,
    CLIENT_ENROLLED,
    ENTRY_CONTEXT,
    GENESIS,
    GENESIS_PREV_HASH,
    KEY_ROTATION,
    MODEL_GENESIS,
    ROUND_ABORTED,
    ROUND_COMMITTED,
    ROUND_OPENED,
    Checkpoint,
    Entry,
    PayloadError,
    compute_entry_hash,
    validate_payload,
)
from coordinator.audit.keys import (
    ALGORITHM,
    SignatureChecker,
    SignatureJob,
    key_id_for,
    parse_public_key,
)
from coordinator.audit.lineage import BlobChecker, BlobLookup, LineageChecker, blob_lookup
from coordinator.audit.lineage import default_blob_lookup as default_blob_lookup
from coordinator.audit.lineage import sha256_file as sha256_file
from coordinator.audit.merkle import MerkleAccumulator

_CHARGE_KINDS = frozenset({ROUND_COMMITTED, ROUND_ABORTED, CHARGE_RECORDED, CLIENT_ENROLLED,
                           BUDGET_CHANGED})
"""Entries the charge walk reads: charges, and the budgets they are held against."""


@dataclass(frozen=True, slots=True)
class Issue:
    """One failed check: the entry (or checkpoint) it concerns and why."""

    check: str
    reason: str
    seq: int | None = None
    checkpoint: int | None = None


@dataclass(frozen=True, slots=True)
class KeyInForce:
    """A key of the rotation chain and the first seq it signs."""

    key_id: str
    public_key: str
    from_seq: int


@dataclass(slots=True)
class VerifyReport:
    """Outcome of ``verify_log``: ok, the first bad entry, and what was checked."""

    ok: bool
    first_bad_seq: int | None
    reason: str | None
    bad_checkpoint: int | None
    counts: dict[str, int]
    issues: list[Issue]
    keys: list[KeyInForce]
    head_seq: int | None
    head_hash: str | None
    genesis_pinned: bool
    signer_pinned: bool = False  # by the genesis key or a trusted head that matched
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form for ``--json`` output and exports."""
        return asdict(self)


@dataclass(slots=True)
class _State:
    """The issues of one verification pass: all counted, the first ``max_issues`` kept."""

    issues: list[Issue] = field(default_factory=list)
    issue_count: int = 0
    max_issues: int = 100

    def add(self, check: str, reason: str, seq: int | None = None, cp: int | None = None) -> None:
        self.issue_count += 1
        if len(self.issues) < self.max_issues:
            self.issues.append(Issue(check, reason, seq, cp))


def _new_counts() -> dict[str, int]:
    return {
        "entries": 0,
        "signatures": 0,
        "key_rotations": 0,
        "rounds_opened": 0,
        "rounds_committed": 0,
        "rounds_aborted": 0,
        "checkpoints": 0,
        "blobs": 0,
        "charges": 0,
        "charges_unchecked": 0,
    }


@dataclass(slots=True)
class _Walk:
    """One pass over the entries: what it checks with, and where it stands."""

    state: _State
    pinned: bytes | None
    wanted_sizes: set[int]  # checkpoint tree sizes, whose heads the walk keeps
    warnings: list[str]
    blobs: BlobChecker | None
    charges: ChargeChecker | None
    lineage: LineageChecker | None
    checker: SignatureChecker = field(default_factory=SignatureChecker)
    counts: dict[str, int] = field(default_factory=_new_counts)
    keys: list[KeyInForce] = field(default_factory=list)
    cur_key: bytes | None = field(init=False)
    cur_kid: str | None = field(init=False)
    # tree size -> (root hex, public key, key id) in force after that many entries
    heads: dict[int, tuple[str, bytes | None, str | None]] = field(default_factory=dict)
    acc: MerkleAccumulator = field(default_factory=MerkleAccumulator)
    expected_seq: int = 0
    prev_hash: str = GENESIS_PREV_HASH
    prev_raft: int = -1
    last: Entry | None = None

    def __post_init__(self) -> None:
        self.cur_key = self.pinned
        self.cur_kid = key_id_for(self.pinned) if self.pinned is not None else None


def verify_log(
    entries: Iterable[Entry],
    checkpoints: Iterable[Checkpoint] = (),
    *,
    genesis_key: bytes | str | None = None,
    blobs: Path | str | BlobLookup | None = None,
    require_blobs: bool = True,
    accountant: Accountant | None = None,
    charge_rel_tol: float = 1e-9,
    charge_abs_tol: float = 1e-12,
    check_lineage: bool = True,
    expected_size: int | None = None,
    trusted_head: Checkpoint | None = None,
    extra_issues: Iterable[Issue] = (),
    max_issues: int = 100,
    workers: int = 1,
) -> VerifyReport:
    """Verify entries (in storage order) and checkpoints; never raises on bad data.

    ``genesis_key`` pins the genesis public key (raw bytes, hex or PEM). ``blobs`` is a
    directory of blobs named by sha256 hex, or a lookup function; with ``require_blobs`` a
    missing blob is a failure. ``accountant`` maps a site's history of ``DPStep``s and a delta
    to epsilon (``charges.prv_epsilon`` is the leader's own); with it every recorded charge
    is recomputed over the site's history in the log, to ``charge_rel_tol`` of the site's
    cumulative epsilon. Without it charges are counted as ``charges_unchecked``.
    ``expected_size`` is a size the log had before (from an earlier export or checkpoint); a
    shorter log is reported as truncated. ``trusted_head`` is a signed head obtained out of
    band (from the cluster's replicated state): the log must hold it, with its root and
    under its key. ``extra_issues`` are problems the caller found in
    the storage itself (a store's index columns, a bundle's unreadable lines).
    ``workers`` > 1 checks signatures in that many processes first (same result, faster
    on large logs on a multi-core machine); 0 picks a number from the log size and CPUs.
    """
    state = _State(max_issues=max_issues)
    cps = sorted(checkpoints, key=lambda c: c.tree_size if type(c.tree_size) is int else -1)
    pinned = parse_public_key(genesis_key) if genesis_key is not None else None
    warnings: list[str] = []
    walk = _Walk(
        state=state,
        pinned=pinned,
        wanted_sizes={c.tree_size for c in cps} | (
            {trusted_head.tree_size} if trusted_head is not None else set()),
        warnings=warnings,
        blobs=_blob_checker(blobs, require_blobs),
        charges=(ChargeChecker(accountant, charge_rel_tol, charge_abs_tol)
                 if accountant is not None else None),
        lineage=LineageChecker(warnings) if check_lineage else None,
    )
    for entry in _prefetch_signatures(walk.checker, entries, pinned, workers):
        _walk_entry(walk, entry)
    tree = heads.TreeHeads(walk.heads, walk.acc.size, walk.checker, state.add)
    head_ok = trusted_head is not None and tree.holds_trusted_head(trusted_head)
    _finish_walk(walk, head_ok)
    checked, truncated_to = tree.check_checkpoints(cps)
    walk.counts["checkpoints"] += checked
    tree.check_truncation(truncated_to, expected_size)
    for issue in extra_issues:
        state.add(issue.check, issue.reason, issue.seq, issue.checkpoint)
    report = _assemble_report(walk)
    report.signer_pinned = walk.pinned is not None or head_ok
    return report


# --- the steps of verify_log, in the order it takes them ----------------------------------


def _blob_checker(blobs: Path | str | BlobLookup | None, require: bool) -> BlobChecker | None:
    """A checker for ``verify_log``'s ``blobs`` argument, or None without blobs."""
    lookup = blob_lookup(blobs)
    return BlobChecker(lookup, require) if lookup is not None else None


def _prefetch_signatures(
    checker: SignatureChecker, entries: Iterable[Entry], pinned: bytes | None, workers: int
) -> Iterable[Entry]:
    """With ``workers`` != 1, check the signatures in worker processes ahead of the walk,
    which then finds the results in ``checker``. Returns the entries to walk."""
    if workers == 1:
        return entries
    entries = list(entries)
    if workers <= 0:
        workers = auto_workers(len(entries))
    checker.prefetch(_signature_jobs(entries, pinned), workers)
    return entries


def _walk_entry(walk: _Walk, entry: Entry) -> None:
    """Check one entry in log order: its place and links, its key and signature, then what
    its kind claims; and add it to the Merkle tree."""
    position = walk.acc.size
    _check_seq(walk, entry)
    linked = _check_chain(walk, entry)
    new_key, key_ok = _check_introduced_key(walk, entry, position)
    signed = _check_signature(walk, entry)
    intact = linked and key_ok and signed
    _follow_key_chain(walk, entry, position, new_key, intact)
    _check_claims(walk, entry, intact)
    _advance(walk, entry)


def _check_seq(walk: _Walk, entry: Entry) -> None:
    """The seq is the next one; after a gap or a step back, the walk counts on from it."""
    expected = walk.expected_seq
    if entry.seq != expected:
        # Name the lower of the two: the missing seq, or the one that moved back.
        gap = type(entry.seq) is int and entry.seq > expected
        walk.state.add(
            "sequence",
            f"expected seq {expected}, found seq {entry.seq}"
            + (" (entries missing)" if gap else " (out of order)"),
            expected if gap or type(entry.seq) is not int else entry.seq,
        )
        walk.expected_seq = entry.seq if type(entry.seq) is int else expected


def _check_chain(walk: _Walk, entry: Entry) -> bool:
    """The entry links to the previous one, its raft index rises and its hash recomputes."""
    state, seq = walk.state, entry.seq
    intact = True
    if entry.prev_hash != walk.prev_hash:
        state.add("chain", "prev_hash does not match the previous entry's hash", seq)
        intact = False
    if type(entry.raft_index) is not int or entry.raft_index <= walk.prev_raft:
        state.add("chain", f"raft_index {entry.raft_index} does not increase", seq)
        intact = False
    try:
        recomputed = compute_entry_hash(
            entry.seq, entry.kind, entry.payload, entry.raft_index, entry.prev_hash,
            entry.key_id,
        )
    except (CanonicalError, TypeError) as exc:
        recomputed = None
        state.add("hash", f"payload has no canonical encoding: {exc}", seq)
        intact = False
    if recomputed is not None and recomputed != entry.entry_hash:
        state.add("hash", "entry_hash does not match the entry's contents", seq)
        intact = False
    return intact


def _check_introduced_key(
    walk: _Walk, entry: Entry, position: int
) -> tuple[bytes | None, bool]:
    """The key a genesis or rotation entry introduces (None if unusable), and whether the
    entry is intact as far as that key goes. Without a pin, the genesis key takes force."""
    if position != 0 and entry.kind not in (GENESIS, KEY_ROTATION):
        return None, True
    new_key = _introduced_key(entry, position, walk.state)
    if position != 0:
        return new_key, True
    if new_key is None:
        return None, False
    if walk.pinned is not None and new_key != walk.pinned:
        walk.state.add("key", "genesis public key differs from the pinned key", entry.seq)
        return new_key, False
    if walk.pinned is None:
        walk.cur_key, walk.cur_kid = new_key, key_id_for(new_key)
    return new_key, True


def _check_signature(walk: _Walk, entry: Entry) -> bool:
    """The entry is signed by the key in force at its seq."""
    seq, cur_kid = entry.seq, walk.cur_kid
    if walk.cur_key is None:
        walk.state.add("signature", "no audit key is in force (genesis unusable)", seq)
        return False
    if entry.key_id != cur_kid:
        walk.state.add(
            "signature", f"claims key {entry.key_id!r} but key {cur_kid!r} is in force", seq
        )
        return False
    if not _signature_ok(walk.checker, walk.cur_key, entry):
        walk.state.add("signature", f"signature is not valid for key {cur_kid}", seq)
        return False
    walk.counts["signatures"] += 1
    return True


def _follow_key_chain(
    walk: _Walk, entry: Entry, position: int, new_key: bytes | None, intact: bool
) -> None:
    """Record the genesis key, and put an intact rotation's key in force after its entry."""
    if position == 0 and walk.cur_key is not None and walk.cur_kid is not None:
        walk.keys.append(KeyInForce(walk.cur_kid, walk.cur_key.hex(), entry.seq))
    if entry.kind == KEY_ROTATION and position > 0 and new_key is not None and intact:
        walk.cur_key, walk.cur_kid = new_key, key_id_for(new_key)
        walk.keys.append(KeyInForce(walk.cur_kid, new_key.hex(), entry.seq + 1))
        walk.counts["key_rotations"] += 1


def _check_claims(walk: _Walk, entry: Entry, intact: bool) -> None:
    """Count rounds, and check the blob, charges and lineage the entry records."""
    kind = entry.kind
    if intact:
        if kind == ROUND_OPENED:
            walk.counts["rounds_opened"] += 1
        elif kind == ROUND_ABORTED:
            walk.counts["rounds_aborted"] += 1
        elif kind == ROUND_COMMITTED:
            walk.counts["rounds_committed"] += 1
        if kind in (MODEL_GENESIS, ROUND_COMMITTED) and walk.blobs is not None:
            walk.blobs.check(entry, _reporter(walk.state, "blob"))
    if kind in _CHARGE_KINDS:
        if walk.charges is not None:
            # A damaged entry is already reported: follow its charges unjudged, so the
            # sites' histories stay whole for the entries after it.
            walk.charges.observe(entry, _reporter(walk.state, "charge") if intact else None)
        elif isinstance(entry.payload.get("charges"), dict):
            walk.counts["charges_unchecked"] += len(entry.payload["charges"])
    if walk.lineage is not None and kind in (MODEL_GENESIS, ROUND_COMMITTED):
        # A damaged entry is already reported; follow its claims without judging them
        # so that one bad entry does not cascade into lineage issues further on.
        walk.lineage.observe(entry, _reporter(walk.state, "lineage") if intact else None)


def _advance(walk: _Walk, entry: Entry) -> None:
    """Add the entry to the Merkle tree and move the walk past it."""
    walk.acc.append(_hash_bytes(entry.entry_hash))
    if walk.acc.size in walk.wanted_sizes:
        walk.heads[walk.acc.size] = (walk.acc.root().hex(), walk.cur_key, walk.cur_kid)
    walk.prev_hash = entry.entry_hash
    walk.prev_raft = entry.raft_index if type(entry.raft_index) is int else walk.prev_raft
    walk.expected_seq += 1
    walk.last = entry


def _finish_walk(walk: _Walk, head_ok: bool) -> None:
    """Totals of the walk, and the warnings an empty or unpinned log earns."""
    size = walk.acc.size
    walk.counts["entries"] = size
    if walk.blobs is not None:
        walk.counts["blobs"] = walk.blobs.found
    if walk.charges is not None:
        walk.counts["charges"] = walk.charges.checked
    if size == 0:
        walk.warnings.append("the log is empty")
    if walk.pinned is None and not head_ok:
        walk.warnings.append(
            "signer not pinned: the log is only shown to be self-consistent; pass the "
            "cluster's audit public key or its signed head to rule out a rewrite under a new key"
        )


def _assemble_report(walk: _Walk) -> VerifyReport:
    """The report: ok, the first bad entry and checkpoint, the headline reason, and all."""
    state, warnings, last = walk.state, walk.warnings, walk.last
    first: Issue | None = None
    first_cp: Issue | None = None
    for issue in state.issues:
        if issue.seq is not None and (first is None or issue.seq < (first.seq or 0)):
            first = issue
        if issue.checkpoint is not None and (
            first_cp is None or issue.checkpoint < (first_cp.checkpoint or 0)
        ):
            first_cp = issue
    headline = first or first_cp or (state.issues[0] if state.issues else None)
    if state.issue_count > len(state.issues):
        warnings.append(f"{state.issue_count - len(state.issues)} further issues not listed")
    return VerifyReport(
        ok=state.issue_count == 0,
        first_bad_seq=first.seq if first else None,
        reason=headline.reason if headline else None,
        bad_checkpoint=first_cp.checkpoint if first_cp else None,
        counts=walk.counts,
        issues=state.issues,
        keys=walk.keys,
        head_seq=last.seq if last else None,
        head_hash=last.entry_hash if last else None,
        genesis_pinned=walk.pinned is not None,
        warnings=warnings,
    )


def auto_workers(entries: int) -> int:
    """Worker processes worth starting for a log of this size (process start-up costs
    about as much as a few thousand signature checks)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if entries < 4000 else max(1, min(cpus or 1, 16, entries // 2000))


def _signature_jobs(entries: Sequence[Entry], pinned: bytes | None) -> list[SignatureJob]:
    """Each entry's signature against the key its key_id names among the keys the log (or
    the pin) introduces. A guess made ahead of the sequential pass: that pass still decides
    which key is in force, and checks anything the guess got wrong itself."""
    keys: dict[str, bytes] = {}
    if pinned is not None:
        keys[key_id_for(pinned)] = pinned
    for e in entries:
        if e.kind in (GENESIS, KEY_ROTATION):
            try:
                key = parse_public_key(e.payload["public_key"])
            except (KeyError, TypeError, ValueError):
                continue
            keys.setdefault(key_id_for(key), key)
    jobs = []
    for e in entries:
        signer_key = keys.get(e.key_id)
        if signer_key is None or not is_sha256_hex(e.entry_hash):
            continue
        try:
            signature = bytes.fromhex(e.signature)
        except (TypeError, ValueError):
            continue
        jobs.append((signer_key, signature, ENTRY_CONTEXT + bytes.fromhex(e.entry_hash)))
    return jobs


def _hash_bytes(hex_hash: str) -> bytes:
    """Leaf data for the Merkle tree; a malformed stored hash still occupies a leaf."""
    if is_sha256_hex(hex_hash):
        return bytes.fromhex(hex_hash)
    return hashlib.sha256(repr(hex_hash).encode()).digest()


def _signature_ok(checker: SignatureChecker, key: bytes, entry: Entry) -> bool:
    if not is_sha256_hex(entry.entry_hash):
        return False
    try:
        signature = bytes.fromhex(entry.signature)
    except (ValueError, TypeError):
        return False
    return checker.check(key, signature, ENTRY_CONTEXT + bytes.fromhex(entry.entry_hash))


def _introduced_key(entry: Entry, position: int, state: _State) -> bytes | None:
    """The public key a genesis or rotation entry introduces, or None with an issue."""
    seq = entry.seq
    if position == 0 and entry.kind != GENESIS:
        state.add("key", f"first entry is {entry.kind!r}, not a genesis entry", seq)
        return None
    if position > 0 and entry.kind == GENESIS:
        state.add("key", "a second genesis entry", seq)
        return None
    try:
        validate_payload(entry.kind, entry.payload)
        if entry.payload["alg"] != ALGORITHM:
            raise PayloadError(f"unsupported key algorithm {entry.payload['alg']!r}")
        key = parse_public_key(entry.payload["public_key"])
        if key_id_for(key) != entry.payload["key_id"]:
            raise PayloadError("key_id does not name the public key")
    except (PayloadError, ValueError) as exc:
        state.add("key", f"{entry.kind} entry does not introduce a usable key: {exc}", seq)
        return None
    return key


def _reporter(state: _State, check: str) -> Callable[[str, int], None]:
    """A (reason, seq) callback that files issues under ``check``."""

    def report(reason: str, seq: int) -> None:
        state.add(check, reason, seq)

    return report
