"""Fixtures for the audit tests: stores on SQLite and PostgreSQL, a realistic log, tampering.

PostgreSQL tests run against FEDRAFT_TEST_PG (default: the local trust-auth server, database
``test``) in a fresh schema per test, dropped afterwards; they are skipped with the reason
when the server cannot be reached.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

from coordinator.audit import AuditSigner, AuditStore
from privacy.accounting import DPStep, charge_increase, dp_step

PG_URL = os.environ.get("FEDRAFT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SITES = [f"site-{i:02d}" for i in range(6)]


def _pg_unreachable() -> str | None:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure means: no server to test against
        return f"PostgreSQL unreachable at {PG_URL}: {str(exc).splitlines()[0]}"
    return None


_PG_PROBE: list[str | None] = []  # empty until probed


def pg_skip_reason() -> str | None:
    """Probe once per session."""
    if not _PG_PROBE:
        _PG_PROBE.append(_pg_unreachable())
    return _PG_PROBE[0]


@pytest.fixture(scope="session")
def signer() -> AuditSigner:
    return AuditSigner.from_seed(hashlib.sha256(b"fedraft test audit key").digest())


@pytest.fixture(scope="session")
def other_signer() -> AuditSigner:
    return AuditSigner.from_seed(hashlib.sha256(b"not the audit key").digest())


@dataclass
class Backend:
    """Opens stores on one database kind and gives raw (trigger-free) access for tampering."""

    name: str
    url: str
    schema: str | None = None
    stores: list[AuditStore] = field(default_factory=list)

    def open(self, **kwargs: Any) -> AuditStore:
        store = AuditStore(self.url, schema=self.schema, **kwargs)
        self.stores.append(store)
        return store

    @property
    def cli_url(self) -> str:
        """A URL that selects the schema by itself, as the CLI receives it."""
        if self.schema is None:
            return self.url
        return f"{self.url}?options=-csearch_path%3D{self.schema}"

    @contextmanager
    def attacker(self, store: AuditStore) -> Iterator[Connection]:
        """A connection with the append-only triggers out of the way, as a DB admin has."""
        with store.engine.begin() as conn:
            if self.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            else:
                for table in ("audit_entries", "audit_checkpoints"):
                    for action in ("update", "delete"):
                        conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{action}"))
            yield conn


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path / 'audit.db'}")
        yield b
        for store in b.stores:
            store.close()
        return
    reason = pg_skip_reason()
    if reason:
        pytest.skip(reason)
    schema = f"audit_test_{uuid.uuid4().hex[:12]}"
    b = Backend("postgresql", PG_URL, schema)
    try:
        yield b
    finally:
        for store in b.stores:
            store.close()
        engine = create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Iterator[Backend]:
    b = Backend("sqlite", f"sqlite:///{tmp_path / 'audit.db'}")
    yield b
    for store in b.stores:
        store.close()


def blob_bytes(round_number: int) -> bytes:
    """Stand-in model weights for a round."""
    return f"model weights after round {round_number}".encode() * 8


@dataclass
class Built:
    """What ``build_log`` wrote, for tests to aim their edits at."""

    versions: list[str]
    seq_of_round: dict[int, int]
    blob_dir: Path | None


def build_log(
    store: AuditStore,
    rounds: int = 12,
    blob_dir: Path | None = None,
    start_index: int = 1,
    accountant: Callable[[Sequence[DPStep], float], float] | None = None,
) -> Built:
    """A realistic log: model genesis, enrolments, rounds with one abort and retry.

    With ``accountant`` each charge records ``epsilon_total`` (the accountant over the
    site's history) and ``epsilon`` (its increase), as the leader does; without it a
    made-up ``epsilon`` only.
    """
    idx = start_index
    history: dict[str, list[DPStep]] = {}
    spent: dict[str, float] = {}
    genesis_blob = blob_bytes(0)
    v0 = hashlib.sha256(genesis_blob).hexdigest()
    if blob_dir is not None:
        blob_dir.mkdir(parents=True, exist_ok=True)
        (blob_dir / v0).write_bytes(genesis_blob)
    store.append("model_genesis", {"version": v0, "size": len(genesis_blob)}, idx)
    for site in SITES:
        idx += 1
        store.append(
            "client_enrolled",
            {"site": site, "public_key": hashlib.sha256(site.encode()).hexdigest(),
             "epsilon": 8.0, "delta": 1e-5},
            idx,
        )
    versions, seq_of_round, parent = [v0], {}, v0
    for r in range(1, rounds + 1):
        participants = SITES[r % 2 :: 1][:5]
        attempt = 0
        if r == 3:  # a round that fails once and is retried
            idx += 1
            store.append("round_opened", {"round": r, "attempt": 0, "term": 2, "base": parent,
                                          "participants": participants,
                                          "config_digest": "cfg-" + str(r)}, idx)
            idx += 1
            store.append("round_aborted", {"round": r, "attempt": 0, "term": 2,
                                           "reason": "stage masked_input timed out"}, idx)
            attempt = 1
        idx += 1
        store.append("round_opened", {"round": r, "attempt": attempt, "term": 2, "base": parent,
                                      "participants": participants,
                                      "config_digest": "cfg-" + str(r)}, idx)
        blob = blob_bytes(r)
        version = hashlib.sha256(blob).hexdigest()
        if blob_dir is not None:
            (blob_dir / version[:2]).mkdir(exist_ok=True)
            (blob_dir / version[:2] / version).write_bytes(blob)
        charges = {}
        for site in participants[:4]:
            params: dict[str, Any] = {"noise_multiplier": 1.1, "sample_rate": 0.02,
                                      "steps": 50 + r, "clip_norm": 1.0, "delta": 1e-5}
            if accountant is None:
                params["epsilon"] = 0.1 + r / 1000
            else:
                history.setdefault(site, []).append(dp_step(params))
                total = accountant(history[site], params["delta"])
                params["epsilon"] = charge_increase(total, spent.get(site, 0.0))
                params["epsilon_total"] = spent[site] = total
            charges[site] = params
        idx += 1
        entry = store.append(
            "round_committed",
            {"round": r, "attempt": attempt, "term": 2, "version": version, "parent": parent,
             "size": len(blob), "participants": participants, "survivors": participants[:4],
             "metrics": {"accuracy": 0.5 + r * 0.03, "loss": 1.0 / r},
             "charges": charges},
            idx,
        )
        seq_of_round[r] = entry.seq
        versions.append(version)
        parent = version
        if r == 6:
            idx += 1
            store.append("budget_changed", {"site": SITES[0], "epsilon": 10.0, "delta": 1e-5},
                         idx)
            idx += 1
            store.append("membership_changed", {"change": "add", "node": "node-4"}, idx)
    return Built(versions, seq_of_round, blob_dir)


def toy_epsilon(history: Sequence[DPStep], delta: float) -> float:
    """A fast deterministic stand-in for the PRV accountant (epsilon of a whole history)."""
    return round(sum(s.steps * s.sample_rate / s.noise_multiplier for s in history) / 10, 9)
