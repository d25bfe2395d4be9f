"""The README's examples are the truth: its node.toml loads with the node's own loader."""

from pathlib import Path

from coordinator.cluster.config import load_node_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_node_toml_loads(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = text.split("On each coordinator machine, a `node.toml`")[1]
    block = block.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "node.toml"
    path.write_text(block)
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "a-raft-secret-of-20-chars")
    cfg = load_node_config(path)
    assert cfg.self_addr.id == "n1" and {p.id for p in cfg.peers} == {"n2", "n3"}
    assert cfg.audit_key is not None and cfg.election_max_s == 2.0
