"""The fleet API holds no thread per waiting site: long polls are coroutines on the bell."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from coordinator import wire
from coordinator.cluster.presence import TaskBell
from coordinator.demo.cluster import LocalCluster


def test_the_bell_wakes_waiting_coroutines_and_threads_alike() -> None:
    bell = TaskBell()

    async def waiters() -> list[float]:
        t0 = time.monotonic()

        async def one() -> float:
            await bell.wait_async(5.0)
            return time.monotonic() - t0

        tasks = [asyncio.create_task(one()) for _ in range(200)]
        await asyncio.sleep(0.2)
        threading.Thread(target=bell.ring).start()  # rung from another thread, as the driver does
        return await asyncio.gather(*tasks)

    woke = asyncio.run(waiters())
    assert max(woke) < 1.0  # every one of them, long before its 5 s timeout
    t0 = time.monotonic()
    asyncio.run(bell.wait_async(0.2))  # nobody rings: the timeout ends the wait
    assert 0.15 < time.monotonic() - t0 < 1.0
    assert not any(bell._futures.values())  # no waiter is left behind


def test_more_waiting_sites_than_workers_do_not_hold_up_a_call(tmp_path: Path) -> None:
    """4 fleet workers, 12 sites long-polling for 8 s: a blob fetch still answers at once
    (a thread-pool server would queue it behind the polls)."""
    c = LocalCluster(tmp_path / "cluster", num_nodes=1, election=(0.3, 0.6))
    c.env["FEDRAFT_LIMITS_FLEET_WORKERS"] = "4"
    try:
        c.start_nodes()
        c.wait_leader(30)
        sites = [f"idle-{i}" for i in range(12)]
        keys = {s: c.add_site(s) for s in sites}
        genesis = c.init_model("breast_cancer")
        fleet = c.nodes[0].fleet
        pollers = []
        for s in sites:
            def poll(site: str = s) -> None:
                ch = wire.Channel(fleet, *c.site_tls(site))
                try:
                    ch.call(wire.FLEET_SERVICE, "Poll", wire.sign({"site": site, "wait": 8.0},
                                                                   keys[site]), timeout=20)
                finally:
                    ch.close()
            pollers.append(threading.Thread(target=poll, daemon=True))
        for t in pollers:
            t.start()
        time.sleep(1.5)  # every poll is waiting on the leader now
        ch = wire.Channel(fleet, *c.site_tls(sites[0]))
        t0 = time.monotonic()
        reply = ch.call(wire.FLEET_SERVICE, "GetBlob", wire.sign(
            {"site": sites[0], "hash": genesis}, keys[sites[0]]), timeout=20)
        took = time.monotonic() - t0
        ch.close()
        assert reply["ok"] and wire.sha256_hex(reply["data"]) == genesis
        assert took < 2.0, f"GetBlob waited {took:.1f} s behind idle polls"
        for t in pollers:
            t.join(20)
    finally:
        c.stop()
