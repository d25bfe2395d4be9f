"""site.toml validation: bad keys, types (from the file or the environment), ranges and
endpoints are refused with an error that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.config import SiteConfigError, load_site_config

SITE = """[site]
id = "hospital-a"
nodes = ["coord1.example.org:7200", "[::1]:7201", "10.0.0.3:7200"]
state_dir = "state"
identity_key = "identity.pem"

[tls]
ca = "ca.pem"
cert = "hospital-a.pem"
key = "hospital-a.key"

[task]
name = "breast_cancer"

[data]
partition = 1
num_partitions = 3
"""


def _write(tmp_path: Path, text: str = SITE) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FEDRAFT_SITE_POLL_WAIT_S", "FEDRAFT_TASK_THREADS", "FEDRAFT_SITE_NODES",
                "FEDRAFT_PRIVACY_DELTA", "FEDRAFT_SITE_ID"):
        monkeypatch.delenv(var, raising=False)


def test_valid_site_config_loads(tmp_path: Path) -> None:
    cfg = load_site_config(_write(tmp_path))
    assert cfg.site_id == "hospital-a" and len(cfg.nodes) == 3 and cfg.data["partition"] == 1


@pytest.mark.parametrize(("edit", "key"), [
    ("\n[bogus]\nx = 1\n", r"^bogus: unknown section"),
    ("\n[privacy]\nepsilon = 3.0\nepsilom = 1.0\n", r"^privacy\.epsilom: unknown key"),
    ("\n[privacy]\nepsilon = -3.0\n", r"^privacy\.epsilon: must be > 0"),
    ("\n[privacy]\nepsilon = 3.0\ndelta = 1.5\n", r"^privacy\.delta: must be in \(0, 1\)"),
    ("\n[privacy]\nepsilon = nan\n", r"^privacy\.epsilon: expected a finite number"),
    ("\n[privacy]\nplanned_rounds = 2.5\n", r"^privacy\.planned_rounds: expected int"),
])
def test_file_errors_name_the_key(tmp_path: Path, edit: str, key: str) -> None:
    with pytest.raises(SiteConfigError, match=key):
        load_site_config(_write(tmp_path, SITE + edit))


@pytest.mark.parametrize(("old", "new", "key"), [
    ("[site]", "task = 5\n[site]", r"^task: expected a table"),
    ('[site]\nid = "hospital-a"', 'site = [["id", "x"]]\n[other]\nid = "x"', r"^site: expected a table"),
    ("partition = 1", "partition = -1", r"^data\.partition: must be >= 0"),
    ("partition = 1", "partition = 3", r"^data\.partition: must be below data\.num_partitions"),
    ('"10.0.0.3:7200"', '"10.0.0.3"', r"^site\.nodes: expected a list of host:port"),
    ('"10.0.0.3:7200"', '"10.0.0.3:99999"', r"^site\.nodes"),
    ('"10.0.0.3:7200"', '"bad host:7200"', r"^site\.nodes"),
    ('id = "hospital-a"', 'id = "../etc"', r"^site\.id"),
    ('name = "breast_cancer"', 'name = "breast_cancer"\nthreads = 0', r"^task\.threads: must be in"),
])
def test_edits_name_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in SITE
    text = SITE.replace(old, new)
    if old == "[site]":  # [task] becomes a number: drop its table
        text = text.replace('[task]\nname = "breast_cancer"\n', "")
    with pytest.raises(SiteConfigError, match=key):
        load_site_config(_write(tmp_path, text))


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("FEDRAFT_SITE_POLL_WAIT_S", "soon", r"^site\.poll_wait_s: expected float"),
    ("FEDRAFT_SITE_POLL_WAIT_S", "-2", r"^site\.poll_wait_s: must be >= 0"),
    ("FEDRAFT_SITE_POLL_WAIT_S", "inf", r"^site\.poll_wait_s: expected a finite number"),
    ("FEDRAFT_TASK_THREADS", "1.5", r"^task\.threads: expected int"),
    ("FEDRAFT_SITE_NODES", "a:1,", r"^site\.nodes"),
    ("FEDRAFT_SITE_ID", "", r"^site\.id"),
])
def test_env_override_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          variable: str, value: str, key: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SiteConfigError, match=key):
        load_site_config(_write(tmp_path))


def test_env_override_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRAFT_SITE_POLL_WAIT_S", "2")
    monkeypatch.setenv("FEDRAFT_SITE_NODES", "a.example:1, b.example:2")
    cfg = load_site_config(_write(tmp_path))
    assert cfg.poll_wait_s == 2.0 and cfg.nodes == ("a.example:1", "b.example:2")
