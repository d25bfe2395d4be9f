"""Observability: the Prometheus exposition of a node, and JSON log lines.

Unit tests parse the exposition back with prometheus_client's own parser; one real
cluster (3 node processes, 3 DP sites, 2 SecAgg rounds) is scraped over HTTP.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator import wire
from coordinator.audit import AuditSigner
from coordinator.audit.writer import AuditWriter
from coordinator.cluster import rpc
from coordinator.cluster.config import ConfigError, NodeAddress, load_node_config, render_node_config
from coordinator.cluster.logs import JsonFormatter
from coordinator.cluster.metrics import NodeMetrics, NodeView, StageClock, abort_class, parse_bind
from coordinator.core.state import apply, initial_state
from coordinator.demo.cluster import LocalCluster

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SECAGG_STAGES = ("advertise", "share", "masked", "unmask")


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(data: Samples, name: str, **labels: str) -> float | None:
    return data.get((name, frozenset(labels.items())))


def total(data: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in data.items() if n == name and want <= ls)


class FakeNode:
    def __init__(self) -> None:
        self.raft = {"state": "leader", "term": 4, "commit_index": 17, "last_applied": 17,
                     "has_quorum": True, "log_len": 18}
        self.sites = {"a": {"spent": 0.25, "epsilon": 8.0, "revoked": False},
                      "b": {"spent": 0.0, "epsilon": 2.0, "revoked": True}}

    def view(self) -> NodeView:
        return NodeView("n1", lambda: dict(self.raft),
                        lambda: {"last_round": 3, "sites": self.sites}, lambda: 2)


def _exercise(m: NodeMetrics, stage_seconds: list[float]) -> None:
    for i, sec in enumerate(stage_seconds):
        m.observe_stage(SECAGG_STAGES[i % 4], sec)
    m.observe_rpc(wire.FLEET_SERVICE, "Poll", "ok", 120, 300)
    m.observe_rpc(wire.FLEET_SERVICE, "Submit", "stale_round", 5000, 40)
    m.audit_written("round_committed")
    m.on_applied({"op": "round_commit"}, {"ok": True}, {})
    m.on_applied({"op": "round_abort", "reason": "too_few_updates (1/3)"}, {"ok": True}, {})


def test_exposition_parses_back_with_help_type_and_sane_values():
    m = NodeMetrics()
    node = FakeNode()
    m.watch(node.view())
    _exercise(m, [0.003, 0.4, 2.0, 7.5, 0.02, 400.0])
    text = m.exposition()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {n: f for n, f in families.items() if n.startswith("fedraft_")}
    expected = {
        "fedraft_raft_role": "gauge", "fedraft_raft_term": "gauge",
        "fedraft_raft_commit_index": "gauge", "fedraft_raft_last_applied": "gauge",
        "fedraft_raft_has_quorum": "gauge", "fedraft_leader_changes": "counter",
        "fedraft_rounds_committed": "counter", "fedraft_rounds_aborted": "counter",
        "fedraft_round_stage_seconds": "histogram", "fedraft_clients_online": "gauge",
        "fedraft_rpc_requests": "counter", "fedraft_rpc_received_bytes": "counter",
        "fedraft_rpc_sent_bytes": "counter", "fedraft_site_epsilon_spent": "gauge",
        "fedraft_site_epsilon_budget": "gauge", "fedraft_audit_entries_written": "counter",
    }
    for name, kind in expected.items():
        assert name in ours, name
        assert ours[name].type == kind, name
        assert ours[name].documentation, name
    # every family we export announces itself (counters under their _total name)
    for name, f in ours.items():
        shown = f"{name}_total" if f.type == "counter" else name
        assert f"# HELP {shown} " in text and f"# TYPE {shown} {f.type}\n" in text, name

    data = samples(text)
    roles = {r: value(data, "fedraft_raft_role", role=r) for r in ("follower", "candidate", "leader")}
    assert roles == {"follower": 0.0, "candidate": 0.0, "leader": 1.0}
    assert value(data, "fedraft_raft_term") == 4
    assert value(data, "fedraft_raft_has_quorum") == 1
    assert value(data, "fedraft_clients_online") == 2
    assert value(data, "fedraft_site_epsilon_spent", site="a") == 0.25
    assert value(data, "fedraft_site_epsilon_budget", site="b") == 2.0
    assert value(data, "fedraft_rounds_committed_total") == 1
    assert value(data, "fedraft_rounds_aborted_total", reason="too_few_updates") == 1
    assert value(data, "fedraft_rpc_requests_total", service=wire.FLEET_SERVICE, method="Submit",
                 code="stale_round") == 1
    assert total(data, "fedraft_rpc_received_bytes_total", service=wire.FLEET_SERVICE) == 5120
    assert total(data, "fedraft_rpc_sent_bytes_total", service=wire.FLEET_SERVICE) == 340
    assert value(data, "fedraft_audit_entries_written_total", kind="round_committed") == 1
    assert value(data, "fedraft_node_info", node="n1") == 1

    # histogram: cumulative buckets never fall, +Inf equals the count, sum adds up
    hist = families["fedraft_round_stage_seconds"]
    by_stage: dict[str, list[tuple[float, float]]] = {}
    for s in hist.samples:
        if s.name.endswith("_bucket"):
            by_stage.setdefault(s.labels["stage"], []).append((float(s.labels["le"]), s.value))
    assert set(by_stage) == set(SECAGG_STAGES)
    for stage, buckets in by_stage.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), stage
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == value(data, "fedraft_round_stage_seconds_count", stage=stage)
    assert value(data, "fedraft_round_stage_seconds_sum", stage="advertise") == pytest.approx(0.023)
    # 400 s lies beyond the last finite bucket: only +Inf holds it
    share = dict(by_stage["share"])
    assert share[300.0] == 1 and share[float("inf")] == 2


def test_counters_never_decrease_between_scrapes():
    m = NodeMetrics()
    m.watch(FakeNode().view())
    before = samples(m.exposition())
    _exercise(m, [0.1, 0.2])
    _exercise(m, [1.0])
    after = samples(m.exposition())
    counters = [k for k in after if k[0].endswith(("_total", "_count", "_bucket", "_sum"))
                and k[0].startswith("fedraft_")]
    assert counters
    for key in counters:
        assert after[key] >= before.get(key, 0.0), key
    assert value(after, "fedraft_rounds_committed_total") == 2


def test_applied_commands_count_leader_changes_and_skip_replays():
    m = NodeMetrics()
    state = initial_state()
    for cmd in ({"op": "claim", "term": 1, "node": "n1", "request_id": "c1"},
                {"op": "claim", "term": 1, "node": "n1", "request_id": "c1"},  # a retry
                {"op": "claim", "term": 3, "node": "n2", "request_id": "c2"},
                {"op": "claim", "term": 2, "node": "n3", "request_id": "c3"}):  # stale: refused
        m.on_applied(cmd, apply(state, cmd), state)
    m.on_applied({"op": "round_commit"}, {"ok": False, "code": "stale_term"}, state)
    m.on_applied({"op": "round_commit"}, {"ok": True, "replayed": True}, state)
    data = samples(m.exposition())
    assert value(data, "fedraft_leader_changes_total") == 1  # the first claim is no change
    assert value(data, "fedraft_rounds_committed_total") == 0


def test_abort_reasons_map_to_bounded_classes():
    assert abort_class("leader_change") == "leader_change"
    assert abort_class("too_few_updates (1/3)") == "too_few_updates"
    assert abort_class("aggregation_failed: only 1 survivors") == "aggregation_failed"
    assert abort_class("refused: site x over budget") == "refused"
    assert abort_class("Something else entirely") == "other"
    assert abort_class("") == "other"


def test_parse_bind():
    assert parse_bind("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_bind("[::1]:0") == ("::1", 0)
    for bad in ("9464", ":9464", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_bind(bad)


def test_stage_clock_reports_each_stage_once_in_order():
    seen: list[tuple[str, float]] = []
    clock = StageClock(lambda stage, sec: seen.append((stage, sec)))
    clock.enter("planning")
    clock.discard()  # an attempt that never opened leaves nothing
    clock.enter("advertise")
    clock.enter("advertise")  # re-entering the current stage is no transition
    time.sleep(0.01)
    clock.enter("share")
    clock.close()
    clock.close()
    assert [s for s, _ in seen] == ["advertise", "share"]
    assert seen[0][1] >= 0.01 and all(sec >= 0 for _, sec in seen)


def test_metrics_served_over_http():
    m = NodeMetrics()
    m.watch(FakeNode().view())
    host, port = m.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            data = samples(resp.read().decode())
        assert value(data, "fedraft_raft_commit_index") == 17
    finally:
        m.close()


class _Context:
    def auth_context(self) -> dict[str, Any]:
        return {}

    def time_remaining(self) -> float | None:
        return None


def test_rpc_wrapper_reports_sizes_and_codes():
    calls: list[tuple[str, str, str, int, int]] = []

    def handler(msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        if msg.get("boom"):
            raise RuntimeError("bug")
        if msg.get("bad"):
            raise wire.WireError("malformed", "bad")
        return {"ok": True, "echo": msg.get("x")}

    anyone = rpc._wrap(handler, frozenset({""}), "svc", "M", lambda *a: calls.append(a))
    for msg in ({"x": "hello"}, {"bad": 1}, {"boom": 1}):
        request = wire.pack(msg)
        body = anyone(request, _Context())
        assert calls[-1][3:] == (len(request), len(body))
    nobody = rpc._wrap(handler, frozenset({"operator"}), "svc", "M", lambda *a: calls.append(a))
    nobody(wire.pack({}), _Context())
    assert [c[2] for c in calls] == ["ok", "malformed", "internal", "forbidden"]
    assert all(c[:2] == ("svc", "M") for c in calls)


def test_handlers_see_their_callers_deadline():
    seen: list[float] = []

    class _Waiting(_Context):
        def time_remaining(self) -> float | None:
            return 2.0

    def handler(msg: dict[str, Any], caller: rpc.Caller) -> dict[str, Any]:
        seen.append(rpc.time_left(10.0))
        return {"ok": True}

    wrapped = rpc._wrap(handler, frozenset({""}))
    wrapped(wire.pack({}), _Waiting())
    wrapped(wire.pack({}), _Context())
    assert 1.5 < seen[0] <= 2.0  # cut to what the caller waits for
    assert seen[1] == 10.0  # no deadline: the handler's own
    assert rpc.time_left(3.0) == 3.0  # outside a call: untouched


def test_audit_writer_counts_appends_not_replays(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    signer = AuditSigner.generate()
    key = "ab" * 32
    state = initial_state()
    commands = [{"op": "enroll", "site": f"s{i}", "public_key": f"{i:02x}" + key[2:],
                 "request_id": f"e{i}"} for i in range(3)]
    results = []
    for cmd in commands:
        results.append((cmd, apply(state, cmd), json.loads(json.dumps(state))))

    written: list[str] = []
    writer = AuditWriter(url, signer, on_written=written.append)
    for cmd, result, st in results[:2]:
        writer.record(cmd, result, st)
    writer.close()
    assert written == ["client_enrolled"] * 2
    # a restarted node replays its journal: only the new entry counts
    written.clear()
    writer = AuditWriter(url, signer, on_written=written.append)
    for cmd, result, st in results:
        writer.record(cmd, result, st)
    writer.close()
    assert written == ["client_enrolled"]


def test_json_formatter_keeps_structured_fields():
    fmt = JsonFormatter()
    record = logging.LogRecord("coordinator.driver", logging.INFO, __file__, 1,
                               "round %s.%s stage %s", (3, 1, "masked"), None)
    record.__dict__.update({"round": 3, "attempt": 1, "term": 7, "stage": "masked",
                            "seconds": 1.25, "participants": ["a", "b"], "msg_extra": Path("/x"),
                            "level": "not allowed to overwrite"})
    out = json.loads(fmt.format(record))
    assert out["msg"] == "round 3.1 stage masked" and out["level"] == "info"
    assert out["logger"] == "coordinator.driver" and isinstance(out["ts"], float)
    assert {k: out[k] for k in ("round", "attempt", "term", "stage", "seconds")} == {
        "round": 3, "attempt": 1, "term": 7, "stage": "masked", "seconds": 1.25}
    assert out["participants"] == ["a", "b"] and out["msg_extra"] == "/x"
    assert "args" not in out and "levelno" not in out
    try:
        raise ValueError("kaput")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: kaput" in json.loads(fmt.format(record))["exc"]


def _node_toml(tmp_path: Path, metrics_bind: str = "") -> Path:
    me = NodeAddress("n1", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    path = tmp_path / "node.toml"
    path.write_text(render_node_config(me, [], tmp_path / "data", tmp_path / "ca.pem",
                                       tmp_path / "n1.pem", tmp_path / "n1.key",
                                       metrics_bind=metrics_bind))
    return path


def test_config_metrics_bind_and_json_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 20)
    for var in ("FEDRAFT_METRICS_BIND", "FEDRAFT_LOG_JSON"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_node_config(_node_toml(tmp_path))
    assert cfg.metrics_bind == "" and cfg.log_json is False  # off unless asked for
    assert load_node_config(_node_toml(tmp_path, "127.0.0.1:9464")).metrics_bind == "127.0.0.1:9464"
    monkeypatch.setenv("FEDRAFT_METRICS_BIND", "0.0.0.0:9100")
    monkeypatch.setenv("FEDRAFT_LOG_JSON", "true")
    cfg = load_node_config(_node_toml(tmp_path, "127.0.0.1:9464"))
    assert cfg.metrics_bind == "0.0.0.0:9100" and cfg.log_json is True
    monkeypatch.setenv("FEDRAFT_METRICS_BIND", "")  # empty switches it off again
    assert load_node_config(_node_toml(tmp_path, "127.0.0.1:9464")).metrics_bind == ""
    monkeypatch.setenv("FEDRAFT_METRICS_BIND", "nope")
    with pytest.raises(ConfigError, match=r"^metrics\.bind"):
        load_node_config(_node_toml(tmp_path))
    monkeypatch.delenv("FEDRAFT_METRICS_BIND")
    monkeypatch.setenv("FEDRAFT_LOG_JSON", "maybe")
    with pytest.raises(ConfigError, match=r"^log\.json"):
        load_node_config(_node_toml(tmp_path))
    monkeypatch.delenv("FEDRAFT_LOG_JSON")
    path = _node_toml(tmp_path)
    path.write_text(path.read_text() + "\n[log]\njson = true\n")
    assert load_node_config(path).log_json is True


# ---------------------------------------------------------------- a real cluster

TASK = "breast_cancer"
SITES = ["obs-0", "obs-1", "obs-2"]
DP = {"epsilon": 8.0, "delta": 1e-5, "planned_rounds": 4, "clip_norm": 1.0, "sample_rate": 0.25,
      "local_epochs": 2}
FAST = {"fraction": 1.0, "min_clients": 3, "lr": 0.1, "compression": 4.0, "local_epochs": 2,
        "batch_size": 16, "collect_timeout_s": 20.0, "online_wait_s": 15.0,
        "secure_aggregation": True, "clip": 0.5}


@pytest.fixture(scope="module")
def trained(make_module_cluster):
    """3 nodes logging JSON, 3 DP sites, 2 committed SecAgg rounds."""
    c = make_module_cluster("observed", sites=SITES, task=TASK, json_logs=True,
                            budget=(DP["epsilon"], DP["delta"]), privacy=DP)
    c.admin.call("Train", {"rounds": 2, "config": FAST})
    c.wait_round(2, timeout=75)
    return c


def scrape(cluster: LocalCluster, node_id: str) -> Samples:
    with urllib.request.urlopen(cluster.metrics_url(node_id), timeout=5) as resp:
        assert resp.status == 200
        return samples(resp.read().decode())


def test_cluster_metrics_are_sane_on_every_node(trained: LocalCluster):
    c = trained
    ids = [n.id for n in c.nodes]
    deadline = time.monotonic() + 15
    while True:  # followers apply the last commit a heartbeat later
        views = {n: scrape(c, n) for n in ids}
        spent = {n: {s: value(v, "fedraft_site_epsilon_spent", site=s) for s in SITES}
                 for n, v in views.items()}
        terms = {value(v, "fedraft_raft_term") for v in views.values()}
        committed = {value(v, "fedraft_rounds_committed_total") for v in views.values()}
        if (len(terms) == 1 and committed == {2.0}
                and all(x == spent[ids[0]] for x in spent.values())) or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    leaders = [n for n, v in views.items() if value(v, "fedraft_raft_role", role="leader") == 1]
    assert len(leaders) == 1, leaders
    leader = views[leaders[0]]
    assert len(terms) == 1 and terms.pop() >= 1
    for n, v in views.items():
        assert value(v, "fedraft_node_info", node=n) == 1
        assert value(v, "fedraft_raft_commit_index") > 0, n
        assert value(v, "fedraft_raft_last_applied") > 0, n
        assert value(v, "fedraft_raft_has_quorum") == 1, n
        assert value(v, "fedraft_round_last_committed") == 2, n
        assert value(v, "fedraft_rounds_committed_total") == 2, n
        assert total(v, "fedraft_audit_entries_written_total") > 0, n
        assert value(v, "fedraft_audit_entries_written_total", kind="round_committed") == 2, n
    for stage in SECAGG_STAGES:
        assert value(leader, "fedraft_round_stage_seconds_count", stage=stage) >= 2, stage
        assert value(leader, "fedraft_round_stage_seconds_sum", stage=stage) > 0, stage
    for stage in ("planning", "aggregate", "replicate", "commit"):
        assert value(leader, "fedraft_round_stage_seconds_count", stage=stage) >= 2, stage
    fleet = wire.FLEET_SERVICE
    assert total(leader, "fedraft_rpc_received_bytes_total", service=fleet) > 0
    assert total(leader, "fedraft_rpc_sent_bytes_total", service=fleet) > 0
    assert total(leader, "fedraft_rpc_requests_total", service=fleet, method="Submit",
                 code="ok") >= 2 * 3 * len(SECAGG_STAGES) - 3  # every site, every stage
    # followers replicate blobs through the admin API
    assert total(leader, "fedraft_rpc_requests_total", service=wire.ADMIN_SERVICE) > 0
    assert value(leader, "fedraft_clients_online") == 3
    for s in SITES:
        eps = spent[leaders[0]][s]
        assert eps is not None and 0 < eps <= value(leader, "fedraft_site_epsilon_budget", site=s)
        assert value(leader, "fedraft_site_epsilon_budget", site=s) == DP["epsilon"]
    assert all(x == spent[ids[0]] for x in spent.values()), spent


def test_cluster_node_logs_are_json_lines(trained: LocalCluster):
    c = trained
    stages: dict[str, set[str]] = {}
    for n in c.nodes:
        lines = (c.root / n.id / "node.log").read_text().splitlines()
        assert lines, n.id
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{n.id}: not a JSON line: {line!r}")
            assert {"ts", "level", "logger", "msg"} <= obj.keys(), line
            if obj.get("event") == "round_stage":
                assert {"round", "attempt", "term", "stage", "seconds"} <= obj.keys(), line
                assert obj["seconds"] >= 0
                stages.setdefault(n.id, set()).add(obj["stage"])
    # the node that led the rounds logged every SecAgg stage with its fields
    assert any(set(SECAGG_STAGES) <= s for s in stages.values()), stages
