"""node.toml validation: every bad key is refused with an error that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cluster.config import (
    ConfigError,
    NodeAddress,
    host_port,
    load_node_config,
    render_node_config,
)


def _write(tmp_path: Path, text: str | None = None, **replace: str) -> Path:
    me = NodeAddress("n1", "127.0.0.1:7100", "127.0.0.1:7200", "127.0.0.1:7300")
    peer = NodeAddress("n2", "127.0.0.1:7101", "127.0.0.1:7201", "127.0.0.1:7301")
    body = text if text is not None else render_node_config(
        me, [peer], tmp_path / "d", tmp_path / "ca.pem", tmp_path / "n1.pem", tmp_path / "n1.key")
    for old, new in replace.items():
        assert old in body
        body = body.replace(old, new)
    path = tmp_path / "node.toml"
    path.write_text(body)
    return path


@pytest.fixture(autouse=True)
def _password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 20)
    for var in ("FEDRAFT_RAFT_ELECTION_MIN_S", "FEDRAFT_NODE_FLEET", "FEDRAFT_LOG_JSON"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("old", "new", "key"), [
    ("[tls]", "[bogus]\nx = 1\n[tls]", r"^bogus: unknown section"),
    ("election_min_s = 0.8", "election_min = 0.8", r"^raft\.election_min: unknown key"),
    ('key = "', 'kye = "', r"^(tls|audit)\.kye: unknown key"),
    ("[node]", "log = 5\n[node]", r"^log: expected a table"),
    ("[raft]", "[[raft]]", r"^raft: expected a table"),
    ('fleet = "127.0.0.1:7200"', 'fleet = "my host:7200"', r"^node\.fleet: expected host:port"),
    ('fleet = "127.0.0.1:7200"', 'fleet = "127.0.0.1:70000"', r"^node\.fleet: expected host:port"),
    ('admin = "127.0.0.1:7301"', 'admin = "127.0.0.1:"', r"^peers\[0\]\.admin: expected host:port"),
    ("election_min_s = 0.8", "election_min_s = -1.0", r"^raft\.election_max_s: must exceed"),
    ("election_min_s = 0.8", 'election_min_s = "fast"', r"^raft\.election_min_s: expected float"),
    ("election_max_s = 1.6", "election_max_s = inf", r"^raft\.election_max_s: expected a finite"),
])
def test_file_errors_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_node_config(_write(tmp_path, **{old: new}))


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("FEDRAFT_RAFT_ELECTION_MIN_S", "soon", r"^raft\.election_min_s: expected float"),
    ("FEDRAFT_RAFT_ELECTION_MIN_S", "nan", r"^raft\.election_min_s: expected a finite"),
    ("FEDRAFT_LOG_JSON", "2", r"^log\.json: expected true or false"),
    ("FEDRAFT_NODE_FLEET", "10.0.0.1", r"^node\.fleet: expected host:port"),
    ("FEDRAFT_RAFT_PASSWORD", "short", r"^raft\.password: must be at least 16"),
])
def test_env_override_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          variable: str, value: str, key: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=key):
        load_node_config(_write(tmp_path))


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_bytes(b"[node]\nid = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_node_config(tmp_path / "node.toml")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_node_config(tmp_path)  # a directory


def test_host_port_accepts_names_and_addresses() -> None:
    for ok in ("coord1.example.org:7200", "10.0.0.1:1", "[::1]:7300", "node_a:65535"):
        assert host_port(ok, "x") == ok
    for bad in ("host", "host:0", "host:65536", ":80", "a b:80", "host:8o", "host:\u0661\u0662"):
        with pytest.raises(ConfigError, match="^x: expected host:port"):
            host_port(bad, "x")
