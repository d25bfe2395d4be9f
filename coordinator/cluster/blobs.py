"""Content-addressed blobs: model versions live here, never in the Raft log.

`BlobStore` is one node's directory of blobs. A blob's name is the sha256 of its bytes,
so any node can serve it and any reader can check it; writes are atomic
(`coordinator.durable`), so a crash leaves either the whole blob or nothing. Every read
is checked against the name: a damaged file (a bad disk, an operator's mistake) is moved
to `quarantine/` and reported as missing, never served.

`BlobService` moves blobs between nodes: it pushes a new version to the peers until a
quorum holds it (a version counts as committed only then), fetches a blob a node lacks
or has quarantined from its peers, and, in the background, pulls every committed version
the node is missing; at start it checks every committed blob it holds, so damage done
while the node was down heals before anyone asks.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from coordinator import durable, wire
from coordinator.cluster.config import NodeAddress
from coordinator.cluster.rpc import PeerChannels
from coordinator.core.queries import quorum
from coordinator.wire import HEX64_CHARS, sha256_hex

log = logging.getLogger(__name__)


class BlobError(Exception):
    pass


COLLECT_EVERY_S = 60.0  # how often a node deletes blobs the retention policy let go
COLLECT_MIN_AGE_S = 600.0  # never a blob younger than this (an upload not committed yet)


class CorruptBlob(BlobError):
    """A blob whose bytes no longer hash to its name; it has been quarantined."""


class BlobStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir = self.directory / "quarantine"

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or not set(digest) <= HEX64_CHARS:
            raise BlobError(f"not a sha256 hex digest: {digest[:80]!r}")
        return self.directory / digest

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_hex(data)
        if expected is not None and expected != digest:
            raise BlobError(f"content hashes to {digest}, not {expected}")
        if not self.intact(digest):  # absent, or damaged and now quarantined
            durable.write_atomic(self._path(digest), data)
        return digest

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its name; CorruptBlob (and the file moved to
        quarantine) when they do not match, BlobError when there is none."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"no blob {digest}") from None
        if sha256_hex(data) != digest:
            where = self.quarantine(digest)
            raise CorruptBlob(f"blob {digest} was corrupt on disk (moved to {where})")
        return data

    def intact(self, digest: str) -> bool:
        """Whether the blob is here and undamaged (a damaged one is quarantined)."""
        try:
            self.get(digest)
        except BlobError:
            return False
        return True

    def quarantine(self, digest: str) -> Path:
        """Move a damaged blob out of the way, kept for a post-mortem, and say so."""
        self.quarantine_dir.mkdir(exist_ok=True)
        target = self.quarantine_dir / f"{digest}.{time.time_ns()}"
        try:
            self._path(digest).replace(target)
        except FileNotFoundError:
            return target  # another thread moved it first
        durable.fsync_dir(self.directory)
        log.error("blob %s is corrupt on disk: moved to %s; fetching it again from a peer",
                  digest[:12], target, extra={"event": "blob_quarantined", "blob": digest})
        return target

    def size(self, digest: str) -> int:
        return self._path(digest).stat().st_size


class BlobService:
    """Blobs across the cluster: push to a quorum, fetch from peers, catch up in the background.

    `peers` and `cluster_size` come from the live membership, so quorums follow it."""

    def __init__(self, store: BlobStore, node_id: str, channels: PeerChannels,
                 peers: Callable[[], list[NodeAddress]], cluster_size: Callable[[], int],
                 workers: int = 8) -> None:
        self.store = store
        self.node_id = node_id
        self._channels = channels
        self._peers = peers
        self._cluster_size = cluster_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blob-push")
        self._missing: set[str] = set()
        self._wakeup = threading.Event()

    def fetch_from_peers(self, digest: str) -> bool:
        """Copy `digest` from the first peer that has it; False when none does."""
        for peer in self._peers():
            try:
                reply = self._channels.get(peer).call(wire.ADMIN_SERVICE, "GetBlob",
                                                      {"hash": digest}, timeout=10)
                if reply.get("ok"):
                    self.store.put(reply["data"], expected=digest)
                    return True
            except (grpc.RpcError, BlobError, KeyError):
                continue
        return False

    def get(self, digest: str) -> bytes | None:
        """The blob, from this node or fetched from a peer (a damaged local copy is
        replaced); None when no reachable node has a good one."""
        for _ in range(2):
            try:
                return self.store.get(digest)
            except CorruptBlob:
                pass  # quarantined: fetch a good copy below
            except BlobError:
                pass
            if not self.fetch_from_peers(digest):
                break
        log.warning("model %s is on no reachable peer yet", digest[:12])
        return None

    def serve(self, digest: str) -> bytes:
        """The blob for a site or a peer; a damaged copy is never served, and is fetched
        again in the background."""
        try:
            return self.store.get(digest)
        except CorruptBlob:
            self.want(digest)
            raise

    def replicate(self, data: bytes, digest: str, timeout: float) -> list[str]:
        """Store locally, push to peers, return the ids of nodes that hold the blob.

        Returns once a quorum holds it (plus a short grace for the others), so an
        unreachable peer costs the round nothing; its push goes on in the background."""
        self.store.put(data, expected=digest)
        holders = [self.node_id]
        pending = {self._pool.submit(self._push, peer, data, digest, timeout)
                   for peer in self._peers()}
        need = quorum(self._cluster_size())
        deadline = time.monotonic() + timeout
        grace_until: float | None = None
        while pending:
            until = deadline if grace_until is None else min(deadline, grace_until)
            done, pending = concurrent.futures.wait(
                pending, timeout=max(0.0, until - time.monotonic()),
                return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                got = f.result() if f.exception() is None else None
                if got:
                    holders.append(got)
            if len(holders) >= need and grace_until is None:
                grace_until = time.monotonic() + 0.2
            if time.monotonic() >= until:
                break
        return holders

    def _push(self, peer: NodeAddress, data: bytes, digest: str, timeout: float) -> str | None:
        try:
            r = self._channels.get(peer).call(wire.ADMIN_SERVICE, "PutBlob", {"data": data},
                                              timeout=timeout)
            return peer.id if r.get("ok") and r.get("hash") == digest else None
        except grpc.RpcError:
            return None

    def want(self, digest: str) -> None:
        """A committed version names `digest`, or this node's copy was damaged: fetch it in
        the background if it is missing. Cheap: called on the Raft thread."""
        if not self.store.has(digest):
            self._missing.add(digest)
            self._wakeup.set()

    def follow(self, retained: Callable[[], list[str]], stopping: threading.Event) -> None:
        """Check every retained blob this node holds once (damage done while it was down
        is quarantined), then pull every retained version it lacks from its peers, and
        delete what the retention policy let go (`collect`), until `stopping`."""
        self._missing.update(h for h in retained() if not self.store.intact(h))
        collected = time.monotonic()
        while not stopping.is_set():
            self._wakeup.wait(2.0)
            self._wakeup.clear()
            for digest in list(self._missing):
                if self.store.has(digest) or self.fetch_from_peers(digest):
                    self._missing.discard(digest)
            if time.monotonic() - collected >= COLLECT_EVERY_S:
                collected = time.monotonic()
                keep = set(retained())
                # versions a snapshot brought were never applied here: fetch them too
                self._missing = (self._missing & keep) | {
                    h for h in keep if not self.store.has(h)}
                if keep:  # an empty state (not loaded yet) keeps everything
                    self.collect(keep)

    def collect(self, keep: set[str], min_age_s: float = COLLECT_MIN_AGE_S) -> int:
        """Delete blobs outside `keep` (`queries.retained_versions`) older than
        `min_age_s`: a blob stored moments ago may be a version not committed yet."""
        removed = 0
        cutoff = time.time() - min_age_s
        for path in self.store.directory.iterdir():
            name = path.name
            if len(name) != 64 or name in keep or not path.is_file():
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("released %d model blobs outside the retention window", removed,
                     extra={"event": "blobs_released"})
        return removed

    def wake(self) -> None:
        self._wakeup.set()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

