"""One way to stand up a real federation in a test: nodes, enrolled sites, a genesis model.

`make_cluster` (function scope) and `make_module_cluster` (module scope) return a factory;
every cluster it makes is stopped (its processes ended by pid) when the scope ends. The
cluster's own `hold(stage, seconds)` and `wait_stage(stage)` (with `fault_hold=True`)
make the leader linger at a stage so a test can kill it there.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from coordinator.demo.cluster import LocalCluster

FAST_ELECTION = (0.6, 1.2)
"""Election timeouts for tests: a lost leader is replaced in about a second."""


@contextmanager
def federation(root: Path, *, nodes: int = 3, election: tuple[float, float] = FAST_ELECTION,
               sites: list[str] | tuple[str, ...] = (), task: str = "breast_cancer",
               split: str = "iid", alpha: float = 0.5, privacy: dict[str, float] | None = None,
               budget: tuple[float, float] | None = None, flower_app: str | None = None,
               genesis: bool = True, leader_timeout: float = 30.0,
               **cluster: Any) -> Iterator[LocalCluster]:
    """Start `nodes` nodes, wait for a leader, enroll `sites` (with `budget` as (epsilon,
    delta) when given), upload the task's (or the Flower app's) genesis model and start the
    site agents, each with its own partition of the task's data and `privacy` settings.
    Extra keyword arguments go to `LocalCluster` (fault_hold, json_logs, hosts, prefix)."""
    c = LocalCluster(root, num_nodes=nodes, election=election, **cluster)
    c.start_nodes()
    try:
        c.wait_leader(leader_timeout)
        for s in sites:
            c.add_site(s, budget=budget)
        if genesis:
            c.init_model(task, flower_app=flower_app)
        for i, s in enumerate(sites):
            c.start_site(s, c.write_site_config(s, task, i, len(sites), split, alpha,
                                                flower_app=flower_app, privacy=privacy))
        yield c
    finally:
        c.stop()


Factory = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Factory]:
    """`make_cluster(name="cluster", **federation_kwargs)`, stopped after the test."""
    with ExitStack() as stack:
        def make(name: str = "cluster", **kwargs: Any) -> LocalCluster:
            return stack.enter_context(federation(tmp_path / name, **kwargs))

        yield make


@pytest.fixture(scope="module")
def make_module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Factory]:
    """As `make_cluster`, for a cluster that the tests of one module share."""
    with ExitStack() as stack:
        def make(name: str = "cluster", **kwargs: Any) -> LocalCluster:
            return stack.enter_context(federation(tmp_path_factory.mktemp(name), **kwargs))

        yield make


def fedraft_cli(cluster: LocalCluster, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the `fedraft` CLI as the cluster's operator (connection from the environment)."""
    ident = cluster.operator
    env = {**cluster.env, "FEDRAFT_ADMIN": ",".join(n.admin for n in cluster.nodes),
           "FEDRAFT_CA": str(ident.ca), "FEDRAFT_CERT": str(ident.cert),
           "FEDRAFT_KEY": str(ident.key)}
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def free_port() -> int:
    """A loopback port free at the moment of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_single_leader(rep: Any, timeout: float = 10.0) -> None:
    """Wait until a one-node `Replica` leads."""
    deadline = time.monotonic() + timeout
    while not rep.is_leader():
        assert time.monotonic() < deadline, "a single node never became leader"
        time.sleep(0.05)
