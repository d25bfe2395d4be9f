"""Unmasking over helper processes: same result as in-process, and no helper outlives its use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.round.mask_pool import MaskPool, split_words
from privacy.prg import apply_masks

ROOT = Path(__file__).resolve().parents[2]
KEYS = [bytes([i]) * 16 for i in range(1, 8)]


def _gone(pid: int) -> bool:
    """Exited: no process, or a zombie whose threads have all ended. A killed process's
    main thread shows as a zombie while its other threads are still being torn down, and
    until then its parent cannot reap it (waitpid reports it still running)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state and threads <= 1


def _wait_gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(_gone(p) for p in pids)


def _expected(x: np.ndarray, add: list[bytes], subtract: list[bytes]) -> np.ndarray:
    want = x.copy()
    apply_masks(want, add, subtract)
    return want


def test_split_words_covers_the_vector_on_block_boundaries() -> None:
    for length in (0, 1, 4, 5, 1000, 1001, 4099):
        for parts in (1, 2, 3, 7):
            slices = split_words(length, parts)
            assert len(slices) <= parts
            assert sum(c for _, c in slices) == length
            assert all(off % 4 == 0 and c > 0 for off, c in slices)
            assert [off for off, _ in slices] == sorted(off for off, _ in slices)
            ends = [off + c for off, c in slices]
            assert all(a == b for a, b in zip(ends[:-1], [o for o, _ in slices[1:]], strict=True))
    with pytest.raises(ValueError):
        split_words(10, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_result_equals_in_process_unmasking(workers: int) -> None:
    rng = np.random.default_rng(workers)
    with MaskPool(workers, min_parallel_words=1024) as pool:
        for length in (5000, 20_003, 7001):  # the second grows the shared buffer
            x = rng.integers(0, 2**32, length, dtype=np.uint32)
            y = x.copy()
            pool(y, KEYS[:3], KEYS[3:])
            assert np.array_equal(y, _expected(x, KEYS[:3], KEYS[3:]))
        pids = pool.helper_pids()
        assert len(pids) == workers
    assert _wait_gone(pids, 5.0), "close() must end every helper"


def test_short_vectors_start_no_helper_and_bad_input_is_refused() -> None:
    with MaskPool(1, min_parallel_words=1024) as pool:
        y = np.zeros(100, np.uint32)
        pool(y, KEYS[:1])
        assert np.array_equal(y, _expected(np.zeros(100, np.uint32), KEYS[:1], []))
        assert pool.helper_pids() == []
        long = np.arange(4096, dtype=np.uint32)
        with pytest.raises(ValueError):
            pool(long, [b"short"])
        with pytest.raises(ValueError):
            pool(long.astype(np.int64), KEYS[:1])
        assert np.array_equal(long, np.arange(4096, dtype=np.uint32)), "a refused call changes nothing"


def test_a_killed_or_hung_helper_costs_no_result() -> None:
    x = np.arange(50_000, dtype=np.uint32)
    want = _expected(x, KEYS[:2], KEYS[2:])
    with MaskPool(1, min_parallel_words=1024) as pool:
        pool.warm_up()
        (killed,) = pool.helper_pids()
        os.kill(killed, signal.SIGKILL)
        assert _wait_gone([killed], 5.0)
        y = x.copy()
        pool(y, KEYS[:2], KEYS[2:])  # a fresh helper takes over
        assert np.array_equal(y, want)
        (hung,) = pool.helper_pids()
        assert hung != killed
        os.kill(hung, signal.SIGSTOP)
        pool.reply_timeout_s = 0.5
        y = x.copy()
        pool(y, KEYS[:2], KEYS[2:])  # the caller does the silent helper's slice itself
        assert np.array_equal(y, want)
        assert _wait_gone([hung], 5.0), "a helper that does not answer is ended"
        pool.reply_timeout_s = 60.0  # the replacement's start-up is not a hang (loaded CI)
        y = x.copy()
        pool(y, KEYS[:2], KEYS[2:])
        assert np.array_equal(y, want)
        assert len(pool.helper_pids()) == 1 and hung not in pool.helper_pids()


def test_helpers_exit_when_their_parent_is_killed() -> None:
    script = textwrap.dedent("""
        import sys, time
        from coordinator.round.mask_pool import MaskPool
        if __name__ == "__main__":
            pool = MaskPool(2, min_parallel_words=1024)
            pool.warm_up()
            print(" ".join(map(str, pool.helper_pids())), flush=True)
            time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        helpers = [int(p) for p in line.split()]
        assert len(helpers) == 2, line
        assert not any(_gone(p) for p in helpers)
        parent.kill()
        parent.wait(5)
        assert _wait_gone(helpers, 2.0), "helpers must exit within about a second of their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
