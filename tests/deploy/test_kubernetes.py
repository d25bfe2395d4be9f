"""deploy/k8s: every manifest validates against the Kubernetes OpenAPI schemas shipped
inside kubernetes-validate (offline, strict: unknown fields fail), and the pieces fit:
node configs load, names and ports agree, Raft is fenced to node pods."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest
import yaml

from client.config import load_site_config
from coordinator.cluster.config import load_node_config

kv = pytest.importorskip("kubernetes_validate", reason="dev dependency kubernetes-validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes these manifests claim (policy/v1 PDB, fsGroupChangePolicy, ...)
# and the newest the installed kubernetes-validate knows.
VERSIONS = ("1.30.0", kv.latest_version())
NODE_LABELS = {"app.kubernetes.io/name": "fedraft", "app.kubernetes.io/component": "node"}


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("FEDRAFT_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in DOCS if d["kind"] != "Kustomization"],
                         ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_validates(doc, version):
    kv.validate(doc, version, strict=True)


def test_validation_is_not_vacuous():
    sts = _one("StatefulSet")
    misspelt = copy.deepcopy(sts)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(misspelt, VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(sts)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, VERSIONS[0], strict=True)


def test_kustomization_lists_the_core_files():
    kustomization = _one("Kustomization")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    optional = {"secrets.yaml", "operator.yaml", "site.yaml", "kustomization.yaml"}
    assert listed == {p.name for p in K8S.glob("*.yaml")} - optional
    assert all(d["metadata"].get("namespace", "fedraft") == "fedraft" for _, d in DOCS
               if d["kind"] not in ("Namespace", "Kustomization"))


def test_statefulset_shape():
    sts = _one("StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    headless = _one("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == NODE_LABELS
    assert _one("Service", "fedraft")["spec"]["selector"] == NODE_LABELS
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"] == NODE_LABELS
    assert NODE_LABELS.items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in container
    assert container["readinessProbe"]["exec"]["command"][0] == "fedraft-healthcheck"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    env = {e["name"]: e for e in container["env"]}
    assert env["FEDRAFT_RAFT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "fedraft-raft"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "raft": 7100, "fleet": 7200, "admin": 7300}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == "/var/lib/fedraft"
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"fedraft-node-tls", "fedraft-audit-key"}
    for name in secrets | {"fedraft-raft"}:
        _one("Secret", name)


def test_pod_disruption_budget():
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == NODE_LABELS


def test_network_policy_opens_raft_only_between_nodes():
    policy = _one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == NODE_LABELS
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    raft_rules = [r for r in policy["spec"]["ingress"]
                  if any(p["port"] in (7100, "raft") for p in r.get("ports", []))]
    assert len(raft_rules) == 1
    (rule,) = raft_rules
    assert rule["from"] == [{"podSelector": {"matchLabels": NODE_LABELS}}]
    # Every rule names its ports: none opens everything.
    assert all(r.get("ports") for r in policy["spec"]["ingress"])


def test_node_configs_load_and_agree(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 32)
    data = _one("ConfigMap", "fedraft-node-config")["data"]
    sts = _one("StatefulSet")
    names = [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    assert sorted(data) == sorted(f"{n}.toml" for n in names)
    configs = {}
    for key, text in data.items():
        (tmp_path / key).write_text(text)
        configs[key[:-5]] = load_node_config(tmp_path / key)
    selves = {name: cfg.self_addr for name, cfg in configs.items()}
    for name, cfg in configs.items():
        assert cfg.self_addr.id == name
        assert set(cfg.peers) == set(selves.values()) - {cfg.self_addr}
        assert cfg.self_addr.raft == f"{name}.fedraft-peers.fedraft.svc.cluster.local:7100"
        assert cfg.cert.name == f"{name}.pem" and cfg.key.name == f"{name}.key"
        assert str(cfg.data_dir) == "/var/lib/fedraft"
    tls_keys = set(_one("Secret", "fedraft-node-tls")["stringData"])
    assert tls_keys == {"ca.pem"} | {f"{n}.pem" for n in names} | {f"{n}.key" for n in names}


def test_site_example_config_loads(tmp_path):
    text = _one("ConfigMap", "fedraft-site-hospital-a")["data"]["site.toml"]
    (tmp_path / "site.toml").write_text(text)
    cfg = load_site_config(tmp_path / "site.toml")
    assert cfg.site_id == "hospital-a" and len(cfg.nodes) == 3
    secret_keys = set(_one("Secret", "fedraft-site-hospital-a")["stringData"])
    assert {cfg.ca.name, cfg.cert.name, cfg.key.name, cfg.identity_key.name} == secret_keys
    assert tomllib.loads(text)["task"]["device"] == "auto"
