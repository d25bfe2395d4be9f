"""Benchmark the enrolled-site scale (issue 16, item 3): 10,000 and 100,000 sites.

Builds a synthetic state through the real pure state machine (`state.apply` with
`commands.enroll`, ids enrolled in random order), gives some sites a privacy history
(charges appended to their records: rounds are not replayed), marks some online, and
times what the leader and the admin API do with it, each as the node does it (a read is
the query plus `Replica.state.read`'s deep copy of its result):

- enrolment: ms per site over the first and the last tenth of the enrolments;
- `Sites`: one page (cold: the first sort of the ids; warm; in the middle; filtered by
  online or revoked; one site with every charge; a page of full ledgers) and its reply
  bytes, and every page in turn (`client list --all`);
- `Status`: its state view plus the online count and first ids, and its reply bytes;
- a round's eligibility and sampling: the driver's step view, the budget keys of every
  eligible site, the cached affordability check, the online intersection, the draw and
  the participants' keys; then the re-check of 100 freshly charged sites;
- a poll's signature check read.

With `--cluster N` it also starts a real 3-node cluster on loopback, enrols N sites
through the admin API (Raft commands, several at once), and times `fedraft client list
--limit 100`, `fedraft client list --all` and `fedraft cluster status` (whole CLI
processes, Python start included) and the bare `Sites` and `Status` calls.

    .venv/bin/python simulations/bench_sites.py                       # 10k and 100k, pure
    .venv/bin/python simulations/bench_sites.py --cluster 10000 --json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator import wire
from coordinator.core import commands, site_pages
from coordinator.core.queries import (
    Fresh,
    budget_keys,
    charge_histories,
    eligible_among,
    identity_keys,
    site_identity,
)
from coordinator.core.site_pages import PageQuery, SiteOrder
from coordinator.core.state import apply, initial_state
from coordinator.round import policy
from coordinator.round.charges import recheck

State = dict[str, Any]


def read(state: State, fn: Callable[[State], Any]) -> Any:
    """What `Replica.state.read` does, less the lock: the query, then a deep copy."""
    return copy.deepcopy(fn(state))


def timed(fn: Callable[[], Any], reps: int = 5) -> tuple[float, Any]:
    """(median ms over `reps` calls, the last result)."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def _charge(rnd: int) -> dict[str, float]:
    return {"round": rnd, "attempt": 1, "noise_multiplier": 1.1, "sample_rate": 0.01,
            "steps": 50.0, "clip_norm": 1.0, "delta": 1e-5, "epsilon": 0.05,
            "epsilon_total": 0.05 * rnd}


def build(n: int, charged: int, charges: int, seed: int) -> tuple[State, list[str], dict[str, float]]:
    """A state with `n` enrolled sites (`charged` of them with `charges` charges each)."""
    ids = [f"site-{i:06d}" for i in range(n)]
    random.Random(seed).shuffle(ids)
    s = initial_state()
    marks: dict[str, float] = {}
    tenth = max(1, n // 10)
    t0 = time.perf_counter()
    for i, site in enumerate(ids):
        if i == tenth:
            marks["enrol_first_ms_per_site"] = (time.perf_counter() - t0) / tenth * 1000
        if i == n - tenth:
            t0 = time.perf_counter()
        key = hashlib.sha256(site.encode()).hexdigest()
        r = apply(s, commands.enroll(site, key, budget={"epsilon": 8.0, "delta": 1e-5}))
        assert r["ok"], r
    marks["enrol_last_ms_per_site"] = (time.perf_counter() - t0) / tenth * 1000
    for site in ids[:charged]:
        rec = s["sites"][site]
        rec["charges"] = [_charge(r) for r in range(1, charges + 1)]
        rec["spent"] = rec["charges"][-1]["epsilon_total"]
    for site in ids[-10:]:
        assert apply(s, commands.revoke(site))["ok"]
    return s, ids, marks


def reply_bytes(reply: dict[str, Any]) -> int:
    return len(wire.pack({"ok": True, **reply}))


def measure_pages(s: State, ids: list[str], online: frozenset[str]) -> dict[str, Any]:
    order = SiteOrder()

    def one(q: PageQuery, on: frozenset[str] | None = online) -> dict[str, Any]:
        return read(s, lambda st: Fresh(
            site_pages.page(st, order.ids(st["sites"]), q, on))).value

    out: dict[str, Any] = {}
    out["page_cold_ms"], _ = timed(lambda: one(PageQuery()), reps=1)
    out["page_ms"], first = timed(lambda: one(PageQuery()))
    out["page_bytes"] = reply_bytes(first)
    middle = sorted(ids)[len(ids) // 2]
    out["page_middle_ms"], _ = timed(lambda: one(PageQuery(after=middle)))
    out["page_online_ms"], _ = timed(lambda: one(PageQuery(online=True)))
    out["page_revoked_ms"], rev = timed(lambda: one(PageQuery(revoked=True)))
    assert rev["total"] == 10
    charged = next(x for x in ids if s["sites"][x]["charges"])
    out["one_site_ms"], single = timed(lambda: one(PageQuery(site=charged)))
    out["one_site_bytes"] = reply_bytes(single)
    out["page_ledgers_ms"], led = timed(lambda: one(PageQuery(limit=1000, charges=True)), reps=3)
    out["page_ledgers_bytes"] = reply_bytes(led)

    def every() -> int:
        after, pages = None, 0
        while True:
            p = one(PageQuery(after=after, limit=site_pages.MAX_LIMIT))
            pages += 1
            after = p["next"]
            if after is None:
                return pages
    out["all_pages_ms"], out["all_pages"] = timed(every, reps=1)
    return out


def measure_status(s: State, online: frozenset[str]) -> dict[str, Any]:
    def status() -> dict[str, Any]:
        view = read(s, lambda st: {
            "fence_term": st["fence_term"], "leader_node": st["leader"],
            "leader_changes": max(0, len(st["leader_history"]) - 1),
            "sites": len(st["sites"]), "versions": len(st["versions"]),
            "target_round": st["training"]["target_round"], "audit_head": st.get("audit_head")})
        return {"state": view, "clients_online": len(online),
                "clients_online_first": site_pages.first_online(online)}
    ms, reply = timed(status)
    return {"status_ms": ms, "status_bytes": reply_bytes(reply)}


def measure_round(s: State, online: frozenset[str], want: int) -> dict[str, Any]:
    """The leader's eligibility and sampling for one round (`RoundDriver._sample` less the
    waiting), its budget cache warm: every charged site checked at its current key."""
    cache = {x: (k, True) for x, k in read(s, budget_keys).value[1].items()}
    rng = random.Random(0)

    def step() -> list[str]:
        read(s, policy.LeaderView.of)
        eligible, keys = read(s, budget_keys).value
        for x in recheck(keys, cache):  # none: every key is cached
            cache[x] = (keys[x], True)
        broke = {x for x in keys if not cache[x][1]}
        want_n = min(want, eligible - len(broke))
        live = read(s, lambda st: Fresh(eligible_among(st, set(online)))).value - broke
        chosen = policy.choose(live, want_n, rng)
        read(s, lambda st: identity_keys(st, chosen))
        return chosen

    out: dict[str, Any] = {}
    out["driver_step_view_ms"], _ = timed(lambda: read(s, policy.LeaderView.of))
    out["sampling_ms"], chosen = timed(step)
    out["budget_keys_ms"], _ = timed(lambda: read(s, budget_keys))
    out["online_eligible_ms"], _ = timed(lambda: read(s, lambda st: Fresh(
        eligible_among(st, set(online)))).value)
    for x in chosen:  # the round charged its participants: their keys changed
        s["sites"][x]["charges"].append(_charge(len(s["sites"][x]["charges"]) + 1))

    def after_round() -> int:
        stale = recheck(read(s, budget_keys).value[1], cache)
        read(s, lambda st: charge_histories(st, stale))
        return len(stale)
    out["recheck_after_round_ms"], out["rechecked_sites"] = timed(after_round)
    out["poll_identity_ms"], _ = timed(lambda: read(s, lambda st: site_identity(st, chosen[0])),
                                       reps=50)
    return out


def pure(n: int, online_n: int, charged: int, charges: int, want: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    s, ids, row = build(n, charged, charges, seed=n)
    row = {"sites": n, "online": online_n, "charged": charged, "charges_each": charges,
           "build_s": round(time.perf_counter() - t0, 1), **row}
    online = frozenset(random.Random(1).sample(ids, online_n))
    row |= measure_pages(s, ids, online)
    row |= measure_status(s, online)
    row |= measure_round(s, online, want)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def cli(c: Any, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """(seconds, result) of one `fedraft` process run as the cluster's operator."""
    ident = c.operator
    env = {**c.env, "FEDRAFT_ADMIN": ",".join(n.admin for n in c.nodes),
           "FEDRAFT_CA": str(ident.ca), "FEDRAFT_CERT": str(ident.cert),
           "FEDRAFT_KEY": str(ident.key)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0, r


def enrol_all(c: Any, n: int, workers: int) -> float:
    """Enrol `n` sites through the admin API, `workers` at a time; returns seconds."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = [wire.public_key_hex(Ed25519PrivateKey.generate()) for _ in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda i: c.admin.call("Enroll", {"site": f"site-{i:06d}",
                                                        "public_key": keys[i]}), range(n)))
    return time.perf_counter() - t0


def cluster(n: int, workers: int) -> dict[str, Any]:
    """Times of the CLI and the bare calls against a real cluster holding `n` sites."""
    from coordinator.demo.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="bench-sites-") as tmp:
        c = LocalCluster(Path(tmp), num_nodes=3)
        c.start_nodes()
        try:
            c.wait_leader(60)
            seconds = enrol_all(c, n, workers)
            ep = c.admin.leader_endpoint()
            row: dict[str, Any] = {"cluster_sites": n, "enrol_s": round(seconds, 1),
                                   "enrol_per_s": round(n / seconds, 1)}
            row["rpc_sites_page_ms"], page = timed(lambda: c.admin.sites(limit=100, endpoint=ep))
            assert page["total"] == n, page["total"]
            row["rpc_sites_page_bytes"] = reply_bytes(page)
            row["rpc_status_ms"], status = timed(lambda: c.admin.call("Status", endpoint=ep))
            row["rpc_status_bytes"] = reply_bytes(status)
            runs = [cli(c, "client", "list", "--limit", "100", "--json") for _ in range(3)]
            row["cli_list_100_s"] = statistics.median(t for t, _ in runs)
            row["cli_list_100_bytes"] = len(runs[0][1].stdout)
            secs, every = cli(c, "client", "list", "--all", "--json")
            assert len(json.loads(every.stdout)["sites"]) == n
            row["cli_list_all_s"], row["cli_list_all_bytes"] = secs, len(every.stdout)
            runs = [cli(c, "cluster", "status", "--json") for _ in range(3)]
            row["cli_status_s"] = statistics.median(t for t, _ in runs)
            row["cli_version_s"] = statistics.median(cli(c, "--help")[0] for _ in range(3))
            return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        finally:
            c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="enrolled sites, comma-separated")
    ap.add_argument("--online", type=int, default=1000, help="sites online")
    ap.add_argument("--charged", type=int, default=1000, help="sites with a privacy history")
    ap.add_argument("--charges", type=int, default=50, help="charges in each such history")
    ap.add_argument("--sample", type=int, default=100, help="sites sampled per round")
    ap.add_argument("--cluster", type=int, default=0,
                    help="also enrol this many sites in a real 3-node cluster (0: no cluster)")
    ap.add_argument("--workers", type=int, default=64, help="enrolments in flight at once")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args()
    rows = [pure(int(n), args.online, args.charged, args.charges, args.sample)
            for n in args.sizes.split(",") if n]
    real = cluster(args.cluster, args.workers) if args.cluster else None
    console = Console()
    t = Table("measure", *(f"{r['sites']:,} sites" for r in rows), title="enrolled-site scale "
              f"({args.online} online, {args.charged} with {args.charges} charges)")
    for key in rows[0] if rows else ():
        if key != "sites":
            t.add_row(key, *(str(r[key]) for r in rows))
    console.print(t)
    if real is not None:
        t = Table("measure", f"cluster, {args.cluster:,} sites", title="real 3-node cluster")
        for key, value in real.items():
            t.add_row(key, str(value))
        console.print(t)
    if args.json:
        print(json.dumps({"pure": rows, "cluster": real}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
