"""Benchmark the audit log: append rate and the time to verify a realistic 10,000-entry log.

Builds a log the way a coordinator would (model genesis, site enrolments, then rounds of
``round_opened`` + ``round_committed`` with per-site privacy charges and metrics, some
rounds aborted and retried), then times offline verification of the entries in memory, the
same from the database, and an export plus bundle verification.

    .venv/bin/python simulations/bench_audit.py            # table
    .venv/bin/python simulations/bench_audit.py --json     # last stdout line: one JSON object
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.audit import AuditSigner, AuditStore, Bundle, verify_log
from coordinator.audit.verify import auto_workers


def build(store: AuditStore, entries: int, sites: int, per_round: int, seed: int) -> int:
    """Append until the log holds ``entries`` entries; returns the number of rounds."""
    rng = random.Random(seed)
    digest = hashlib.sha256(b"round config").hexdigest()
    names = [f"hospital-{i:03d}" for i in range(sites)]
    index = 1
    version = hashlib.sha256(b"initial model").hexdigest()
    store.append("model_genesis", {"version": version, "size": 1_843_200}, index)
    for name in names:
        index += 1
        store.append("client_enrolled", {
            "site": name, "public_key": hashlib.sha256(name.encode()).hexdigest(),
            "epsilon": 10.0, "delta": 1e-5}, index)
    rnd, accuracy = 0, 0.5
    size = len(store)

    def add(kind: str, payload: dict[str, Any]) -> None:
        nonlocal index, size
        index += 1
        size = store.append(kind, payload, index).seq + 1

    while size < entries:
        rnd += 1
        participants = sorted(rng.sample(names, per_round))
        attempt = 0
        common = {"round": rnd, "term": 3}
        if rnd % 25 == 0 and size + 2 < entries:
            add("round_opened", {**common, "attempt": 0, "base": version,
                                 "participants": participants, "config_digest": digest})
            add("round_aborted", {**common, "attempt": 0,
                                  "reason": "unmask stage deadline passed"})
            attempt = 1
        add("round_opened", {**common, "attempt": attempt, "base": version,
                             "participants": participants, "config_digest": digest})
        if size >= entries:
            break
        survivors = [p for p in participants if rng.random() > 0.1]
        accuracy += (0.97 - accuracy) * 0.02
        charges = {
            site: {"noise_multiplier": 1.1, "sample_rate": 0.0125, "steps": 40,
                   "clip_norm": 1.0, "epsilon": round(0.05 + rng.random() * 0.01, 9),
                   "delta": 1e-5}
            for site in survivors
        }
        new_version = hashlib.sha256(f"{version}{rnd}".encode()).hexdigest()
        add("round_committed", {
            **common, "attempt": attempt, "version": new_version, "parent": version,
            "size": 1_843_200, "participants": participants, "survivors": survivors,
            "metrics": {"accuracy": round(accuracy, 6), "loss": round(1 - accuracy, 6),
                        "examples": 1000 * len(survivors)},
            "charges": charges})
        version = new_version
    return rnd


def timed(fn: Any, repeat: int = 1) -> tuple[float, Any]:
    """Median wall time over ``repeat`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--sites", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=10, help="participants per round")
    parser.add_argument("--checkpoint-every", type=int, default=256)
    parser.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--schema", help="PostgreSQL schema to create and use")
    parser.add_argument("--repeat", type=int, default=3, help="verify runs (median)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)

    signer = AuditSigner.from_seed(hashlib.sha256(b"bench audit key").digest())
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'audit.db'}"
        with AuditStore(url, signer=signer, checkpoint_every=args.checkpoint_every,
                        schema=args.schema) as store:
            if len(store):
                print(f"{url} is not empty", file=sys.stderr)
                return 2
            append_s, rounds = timed(
                lambda: build(store, args.entries, args.sites, args.per_round, args.seed))
            load_s, (entries, checkpoints) = timed(
                lambda: (store.entries(), store.checkpoints()))
            verify_s, report = timed(
                lambda: verify_log(entries, checkpoints, genesis_key=signer.public_key),
                args.repeat)
            parallel_s, parallel_report = timed(
                lambda: verify_log(entries, checkpoints, genesis_key=signer.public_key,
                                   workers=0), args.repeat)
            if not report.ok or not parallel_report.ok:
                print(f"verification failed: {report.reason}", file=sys.stderr)
                return 1
            db_verify_s, db_report = timed(
                lambda: store.verify(genesis_key=signer.public_key))
            export_s, _ = timed(lambda: store.export(Path(tmp) / "bundle"))
            bundle_s, bundle_report = timed(
                lambda: Bundle(Path(tmp) / "bundle").verify(genesis_key=signer.public_key))
            assert db_report.ok and bundle_report.ok
        n = len(entries)
        result = {
            "entries": n,
            "rounds": rounds,
            "checkpoints": len(checkpoints),
            "append_s": round(append_s, 3),
            "append_per_s": round(n / append_s, 1),
            "load_s": round(load_s, 3),
            "verify_s": round(verify_s, 3),
            "verify_entries_per_s": round(n / verify_s, 1),
            "verify_parallel_s": round(parallel_s, 3),
            "workers": auto_workers(n),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "db_verify_s": round(db_verify_s, 3),
            "export_s": round(export_s, 3),
            "bundle_verify_s": round(bundle_s, 3),
            "backend": url.split(":", 1)[0],
        }

    table = Table(title=f"audit log benchmark ({n} entries, {rounds} rounds)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("append (all entries)", f"{result['append_s']:.2f} s"),
        ("append rate", f"{result['append_per_s']:.0f} entries/s"),
        ("load entries from the database", f"{result['load_s']:.3f} s"),
        ("verify in memory (median)", f"{result['verify_s']:.3f} s"),
        ("verify rate", f"{result['verify_entries_per_s']:.0f} entries/s"),
        (f"verify with {result['workers']} worker processes (median)",
         f"{result['verify_parallel_s']:.3f} s"),
        ("load + verify from the database", f"{result['db_verify_s']:.3f} s"),
        ("export bundle", f"{result['export_s']:.3f} s"),
        ("verify bundle offline", f"{result['bundle_verify_s']:.3f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    Console().print(f"{result['cpus']} CPUs, 1-minute load average {result['load_avg_1m']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
