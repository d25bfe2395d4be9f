"""Secrets stay secret: every key the CLIs write is private, no key is overwritten, and an
error prints one line, never a trace whose local variables hold a password or a key."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cluster import pki
from coordinator.cluster.config import NodeAddress, render_node_config

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "a-raft-secret-that-must-not-leak"


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
         module: str = "coordinator") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a workstation usually has: new files readable by all
    try:
        yield
    finally:
        os.umask(old)


def _private_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (
        p.suffix == ".key" or p.name == "identity.pem" or b"PRIVATE KEY" in p.read_bytes())]


def test_keys_the_clis_write_are_private(tmp_path: Path, loose_umask: None) -> None:
    assert _run(["certs", "init", "ca"], tmp_path).returncode == 0
    assert _run(["certs", "issue", "node", "n1", "--ca-dir", "ca", "--out", "n1"],
                tmp_path).returncode == 0
    assert _run(["keygen", "-o", "site/identity.pem"], tmp_path, module="client").returncode == 0
    keys = _private_files(tmp_path)
    assert {p.name for p in keys} >= {"ca.key", "n1.key", "identity.pem"}
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))


def test_issuing_into_the_ca_directory_never_overwrites_the_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    out = _run(["certs", "issue", "operator", "ca", "--ca-dir", "ca", "--out", "ca"], tmp_path)
    assert out.returncode == 2 and "refusing to overwrite" in out.stderr
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before
    bad = _run(["certs", "issue", "operator", "../escape", "--ca-dir", "ca", "--out", "x"], tmp_path)
    assert bad.returncode == 2 and not (tmp_path / "escape.key").exists()


def test_a_node_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    ident = pki.issue(tmp_path / "ca", tmp_path / "tls", "node", "n1")
    me = NodeAddress("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    config = tmp_path / "node.toml"
    config.write_text(render_node_config(me, [], tmp_path / "data", ident.ca, ident.cert,
                                         ident.key, audit_key=tmp_path / "no-such-key.pem"))
    out = _run(["node", "start", "--config", str(config)], tmp_path,
               env={"FEDRAFT_RAFT_PASSWORD": PASSWORD})
    assert out.returncode == 2, out.stderr
    assert "no-such-key.pem" in out.stderr and "Traceback" not in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr


def test_a_failing_site_command_prints_one_line_without_key_material(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca")
    ident = pki.issue(tmp_path / "ca", tmp_path / "tls", "client", "s1")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    out = _run(["evaluate", "--task", "breast_cancer", str(bad)], tmp_path, module="client")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "PRIVATE KEY" not in out.stderr and ident.key.read_text()[40:80] not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) == 1, out.stderr


def test_the_demo_clusters_files_are_private(tmp_path: Path, loose_umask: None) -> None:
    from coordinator.demo.cluster import LocalCluster

    c = LocalCluster(tmp_path / "cluster", num_nodes=3)
    try:
        c.add_site("site-1", enroll=False)
        keys = _private_files(c.root)
        assert len(keys) >= 1 + 1 + 3 + 2  # CA, operator, nodes, the site's TLS and identity
        for path in keys:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        again = LocalCluster(tmp_path / "cluster", num_nodes=3)  # same root: keys reused
        assert again.operator.key.read_bytes() == c.operator.key.read_bytes()
        again.admin.close()
    finally:
        c.admin.close()
