"""Fuzz the node and site configuration loaders with TOML-ish documents, edited real
files and environment overrides: a loaded config, or ConfigError / SiteConfigError
naming what is wrong, never another exception."""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from client.config import _SECTIONS as SITE_SECTIONS
from client.config import SiteConfig, SiteConfigError, load_site_config
from coordinator.cluster.config import (
    SECTIONS,
    ConfigError,
    NodeAddress,
    NodeConfig,
    host_port,
    load_node_config,
    render_node_config,
)
from tests.fuzz.common import count, fuzz, mutated

DIR = Path(tempfile.mkdtemp(prefix="fedraft-fuzz-config-"))
atexit.register(shutil.rmtree, DIR, ignore_errors=True)
_BARE = re.compile(r"[A-Za-z0-9_-]+")

PLAUSIBLE = st.sampled_from([
    "127.0.0.1:7100", "[::1]:7200", "node-a:0", "host:99999", "a b:80", ":80", "x" * 20,
    "sqlite:///tmp/a.db", "ca.pem", "", "0", "-1", "nan", "1e999", "true", "yes", "n1",
])
LEAF = st.one_of(st.text(max_size=20), PLAUSIBLE, st.integers(-(2**63), 2**63 - 1),
                 st.floats(), st.booleans())
VALUE = st.recursive(LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else json.dumps(k)


def _toml(v: Any) -> str:
    """A TOML literal of `v` (strings through JSON, whose escapes TOML shares)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{_key(k)} = {_toml(x)}" for k, x in v.items()) + "}"


def _document(tables: dict[str, Any]) -> str:
    lines = []
    for name, table in tables.items():
        if isinstance(table, list):  # an array of tables
            for item in table:
                lines += [f"[[{_key(name)}]]", *(f"{_key(k)} = {_toml(v)}" for k, v in item.items())]
        elif isinstance(table, dict):
            lines += [f"[{_key(name)}]", *(f"{_key(k)} = {_toml(v)}" for k, v in table.items())]
        else:
            lines.insert(0, f"{_key(name)} = {_toml(table)}")
    return "\n".join(lines) + "\n"


def _tables(sections: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Documents made of the loader's own section and key names (and a few strangers)."""
    names = sorted(sections)
    keys = sorted({k for s in sections.values() for k in s}) + ["colour"]
    table = st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), VALUE, max_size=6)
    return st.dictionaries(st.sampled_from([*names, "peers", "bogus"]),
                           st.one_of(table, st.lists(table, max_size=3), LEAF), max_size=8)


def _env(sections: dict[str, Any]) -> st.SearchStrategy[dict[str, str]]:
    names = [f"FEDRAFT_{s}_{k}".upper() for s, keys in sections.items() for k in keys]
    return st.dictionaries(st.sampled_from(names),
                           st.one_of(PLAUSIBLE, st.text(max_size=12).filter(lambda t: "\0" not in t)),
                           max_size=3)


def _with_env(env: dict[str, str]) -> mock._patch_dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDRAFT_")}
    return mock.patch.dict(os.environ, clean | env, clear=True)


ME = NodeAddress("n1", "127.0.0.1:7100", "127.0.0.1:7200", "127.0.0.1:7300")
PEER = NodeAddress("n2", "127.0.0.1:7101", "127.0.0.1:7201", "127.0.0.1:7301")
NODE_TOML = render_node_config(ME, [PEER], DIR / "data", DIR / "ca.pem", DIR / "n1.pem",
                               DIR / "n1.key").replace(
    "[raft]\n", '[raft]\npassword = "0123456789abcdef0123"\n') + "\n[limits]\nfleet_rps = 5.0\n"


def _load_node(text: str | bytes, env: dict[str, str]) -> NodeConfig | None:
    path = DIR / "node.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with _with_env(env):
        try:
            cfg = load_node_config(path)
        except ConfigError as exc:
            assert str(exc)
            return None
    for addr in cfg.all_nodes:
        for where in ("raft", "fleet", "admin"):
            host_port(getattr(addr, where), where)
    assert len(cfg.raft_password) >= 16 and 0.05 <= cfg.election_min_s < cfg.election_max_s
    assert cfg.fleet_workers >= 1 and cfg.fleet_limit.rate >= 0 and cfg.admin_limit.burst >= 1
    return cfg


def test_rendered_node_config_loads() -> None:
    cfg = _load_node(NODE_TOML, {})
    assert cfg is not None and cfg.fleet_limit.rate == 5.0


@fuzz
@given(_tables({**SECTIONS, "peers": {"id", "raft", "fleet", "admin"}}), _env(SECTIONS))
def test_node_config_documents(tables: dict[str, Any], env: dict[str, str]) -> None:
    count("config.load_node_config documents")
    _load_node(_document(tables), env)


@fuzz
@given(st.one_of(mutated(NODE_TOML.encode()), st.binary(max_size=200)), _env(SECTIONS))
def test_node_config_edited_files(text: bytes, env: dict[str, str]) -> None:
    count("config.load_node_config edited")
    _load_node(text, env)


SITE_TOML = """[site]
id = "hospital-a"
nodes = ["127.0.0.1:7200", "[::1]:7201"]
state_dir = "state"
identity_key = "identity.pem"
poll_wait_s = 2.0

[tls]
ca = "ca.pem"
cert = "hospital-a.pem"
key = "hospital-a.key"

[task]
name = "breast_cancer"
threads = 1

[privacy]
epsilon = 3.0
delta = 1e-5

[data]
partition = 1
num_partitions = 3
alpha = 0.5
"""


def _load_site(text: str | bytes, env: dict[str, str]) -> SiteConfig | None:
    path = DIR / "site.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with _with_env(env):
        try:
            cfg = load_site_config(path)
        except SiteConfigError as exc:
            assert str(exc)
            return None
    assert cfg.nodes and all(isinstance(n, str) for n in cfg.nodes)
    assert (cfg.task is None) != (cfg.flower_app is None)
    assert cfg.poll_wait_s >= 0 and cfg.threads >= 1
    return cfg


def test_site_config_loads() -> None:
    assert _load_site(SITE_TOML, {}) is not None


@fuzz
@given(_tables(SITE_SECTIONS), _env(SITE_SECTIONS))
def test_site_config_documents(tables: dict[str, Any], env: dict[str, str]) -> None:
    count("config.load_site_config documents")
    _load_site(_document(tables), env)


@fuzz
@given(st.one_of(mutated(SITE_TOML.encode()), st.binary(max_size=200)), _env(SITE_SECTIONS))
def test_site_config_edited_files(text: bytes, env: dict[str, str]) -> None:
    count("config.load_site_config edited")
    _load_site(text, env)
