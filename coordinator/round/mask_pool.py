"""Unmasking on several cores: helper processes each strip every mask from one slice.

Why processes: AES-CTR expansion dominates the leader's unmask step, and `cryptography`
holds the GIL while it runs, so threads do not help. Each helper expands every key's
keystream for its own slice of coordinates (AES-CTR can start at any block) into shared
memory; the calling thread does the first slice itself, then adds the helpers' net masks.
The result is bit for bit `privacy.prg.apply_masks` on the whole vector.

Helpers start on first use (short vectors never start them) and exit on `close()`, or
within a second of their parent's death, so a SIGKILLed node leaves no process behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Iterable
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import msgpack
import numpy as np

from privacy.prg import apply_masks, check_key, check_target

log = logging.getLogger(__name__)

MIN_PARALLEL_WORDS = 1 << 18
"""Shorter vectors are unmasked in the calling thread: the hand-off would cost more."""

# The pipe protocol: msgpack requests, byte replies (nothing is unpickled from a pipe).
_STOP, _PING, _OK = b"stop", b"ping", b"ok"
_MAX_REPLY = 4096


def split_words(length: int, parts: int) -> list[tuple[int, int]]:
    """(offset, count) slices covering range(length); every offset is a multiple of 4."""
    if length < 0 or parts < 1:
        raise ValueError("length must be >= 0 and parts >= 1")
    step = -(-length // parts)
    step += -step % 4
    return [(off, min(step, length - off)) for off in range(0, length, max(step, 4))]


class _Helper:
    """One helper process and the pipe to it; the caller's thread talks to it directly."""

    def __init__(self, parent_pid: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork: the node runs many threads
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, parent_pid),
                                   name="fedraft-unmask", daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        try:
            self.conn.send_bytes(_STOP)
        except OSError:
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()


class MaskPool:
    """Applies masks like `apply_masks`, over the caller and `workers` helper processes.

    Helpers import this module (spawned, not forked), so it imports nothing heavy: the
    default count is the node config's (`[limits] unmask_workers`)."""

    def __init__(self, workers: int, min_parallel_words: int = MIN_PARALLEL_WORDS) -> None:
        self.workers = int(workers)
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        self.min_parallel_words = int(min_parallel_words)
        self.reply_timeout_s = 60.0
        self._helpers: list[_Helper | None] = [None] * self.workers
        self._shm: shared_memory.SharedMemory | None = None
        self._lock = threading.Lock()  # one unmask at a time owns the helpers and the buffer
        self._closed = False

    def __enter__(self) -> MaskPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, target: np.ndarray, add: Iterable[bytes] = (), subtract: Iterable[bytes] = ()) -> None:
        add, subtract = list(add), list(subtract)
        small = (not isinstance(target, np.ndarray) or target.ndim != 1
                 or target.shape[0] < self.min_parallel_words)
        if self.workers == 0 or self._closed or small:
            apply_masks(target, add, subtract)
            return
        with self._lock:
            self._apply_parallel(target, add, subtract)

    def _apply_parallel(self, target: np.ndarray, add: list[bytes], subtract: list[bytes]) -> None:
        # Bad targets and keys fail here, before any helper is asked to do anything.
        check_target(target)
        for key in (*add, *subtract):
            check_key(key)
        slices = split_words(target.shape[0], self.workers + 1)
        shared = self._buffer(target.shape[0])
        assert self._shm is not None
        asked: list[tuple[int, int, _Helper | None]] = []
        for i, (off, count) in enumerate(slices[1:]):
            helper = self._helper(i)
            try:
                helper.conn.send_bytes(msgpack.packb(
                    [self._shm.name, shared.shape[0], off, count, add, subtract]))
            except OSError:
                self._drop(i)
                helper = None
            asked.append((off, count, helper))
        off0, count0 = slices[0]
        apply_masks(target[off0 : off0 + count0], add, subtract, offset_words=off0)
        for i, (off, count, helper) in enumerate(asked):
            part = target[off : off + count]
            if helper is not None and self._answered(helper):
                np.add(part, shared[off : off + count], out=part)
                continue
            # The helper died or failed: do its slice here rather than lose the round.
            log.warning("unmask helper %s lost; finishing its slice in-process",
                        helper.process.pid if helper else "?")
            self._drop(i)
            apply_masks(part, add, subtract, offset_words=off)

    def _answered(self, helper: _Helper) -> bool:
        try:
            if not helper.conn.poll(self.reply_timeout_s):
                return False
            reply = helper.conn.recv_bytes(_MAX_REPLY)
        except (EOFError, OSError):
            return False
        if reply != _OK:
            log.warning("unmask helper failed: %s", reply.decode("utf-8", "replace"))
        return reply == _OK

    def _helper(self, i: int) -> _Helper:
        helper = self._helpers[i]
        if helper is None or not helper.process.is_alive():
            if helper is not None:
                helper.stop()
            helper = self._helpers[i] = _Helper(os.getpid())
            log.info("unmask helper %d started (pid %s)", i, helper.process.pid)
        return helper

    def _drop(self, i: int) -> None:
        helper, self._helpers[i] = self._helpers[i], None
        if helper is not None:
            helper.stop()

    def _buffer(self, length: int) -> np.ndarray:
        if self._shm is None or self._shm.size < 4 * length:
            self._release_shm()
            self._shm = shared_memory.SharedMemory(create=True, size=4 * length)
        return np.ndarray((self._shm.size // 4,), dtype=np.uint32, buffer=self._shm.buf)

    def _release_shm(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            shm.close()
            shm.unlink()

    def warm_up(self) -> None:
        """Start every helper now, so the first unmask does not pay for process start-up."""
        with self._lock:
            if self._closed:
                return
            helpers = [self._helper(i) for i in range(self.workers)]
            for helper in helpers:
                helper.conn.send_bytes(_PING)
            for i, helper in enumerate(helpers):
                if not self._answered(helper):
                    self._drop(i)

    def helper_pids(self) -> list[int]:
        """Pids of the helper processes now running."""
        return sorted(h.process.pid for h in self._helpers
                      if h is not None and h.process.pid is not None)

    def close(self) -> None:
        """Stop the helpers and free the shared buffer; later calls run in-process."""
        with self._lock:
            self._closed = True
            for i in range(self.workers):
                self._drop(i)
            self._release_shm()


# --------------------------------------------------------------------------- in helpers


def _serve(conn: Connection, parent: int) -> None:
    """A helper's loop: one slice per request, until _STOP or the pipe closes."""
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    attached: dict[str, shared_memory.SharedMemory] = {}
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if request == _STOP:
            return
        if request == _PING:
            conn.send_bytes(_OK)
            continue
        try:
            _net_mask(attached, *msgpack.unpackb(request))
        except Exception as exc:  # reported to the caller, who redoes the slice
            conn.send_bytes(f"{exc.__class__.__name__}: {exc}".encode()[:_MAX_REPLY])
        else:
            conn.send_bytes(_OK)


def _watch_parent(parent: int) -> None:
    """Exit soon after the parent dies, even in the middle of a slice."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


def _net_mask(attached: dict[str, shared_memory.SharedMemory], name: str, words: int,
              offset: int, count: int, add: list[bytes], subtract: list[bytes]) -> None:
    """Write the net mask of slice [offset, offset + count) into the shared buffer `name`."""
    shm = attached.get(name)
    if shm is None:
        for old in attached.values():
            old.close()
        attached.clear()
        shm = attached[name] = shared_memory.SharedMemory(name=name)
    view = np.ndarray((words,), dtype=np.uint32, buffer=shm.buf)[offset : offset + count]
    view.fill(0)
    apply_masks(view, add, subtract, offset_words=offset)
