"""Who is polling this node, and a doorbell for sites waiting on a long poll.

Both are leader-side memory, rebuilt from scratch after a leader change and never
replicated: which sites polled recently decides who can be sampled, and the doorbell
wakes long polls when a round opens, a stage closes or a leader claims its term.
"""

from __future__ import annotations

import asyncio
import threading
import time


class OnlineSites:
    """Sites that polled this node recently; only the leader's view is used."""

    def __init__(self, window_s: float = 8.0) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, site: str) -> None:
        with self._lock:
            self._seen[site] = time.monotonic()

    def online(self) -> set[str]:
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            return {s for s, t in self._seen.items() if t >= cutoff}


class TaskBell:
    """Rings when the tasks sites may get could have changed; long polls wait on it.

    Threads wait with `wait`; the fleet API's coroutines with `wait_async`, which holds
    no thread: a ring resolves each waiting coroutine's future on its own event loop."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lock = threading.Lock()
        self._futures: dict[asyncio.AbstractEventLoop, set[asyncio.Future[None]]] = {}

    def ring(self) -> None:
        with self._changed:
            self._changed.notify_all()
        with self._lock:
            waiting, self._futures = self._futures, {}
        for loop, futures in waiting.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def wait(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    async def wait_async(self, timeout: float) -> None:
        """Until the next ring or `timeout` seconds, whichever comes first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._futures.setdefault(loop, set()).add(future)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._futures.get(loop, set()).discard(future)


def _resolve(futures: set[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
