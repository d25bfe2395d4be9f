"""deploy/compose: the compose files validate against the compose-spec schema that
check-jsonschema ships (no download), and services, volumes, secrets and the example
node/site configs fit together."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.config import load_site_config
from coordinator.cluster.config import load_node_config

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "compose"
NODES = ("n1", "n2", "n3")
SITES = ("site-a", "site-b")


def _check_jsonschema() -> str:
    found = Path(sys.executable).with_name("check-jsonschema")
    if found.exists():
        return str(found)
    path = shutil.which("check-jsonschema")
    if path is None:
        pytest.skip("dev dependency check-jsonschema is not installed")
    return path


def _validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("FEDRAFT_"):
            monkeypatch.delenv(key)


def test_compose_files_validate_against_the_compose_spec():
    result = _validate(COMPOSE / "compose.yaml", COMPOSE / "compose.gpu.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_validation_is_not_vacuous(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  n1:\n    image: x\n    restart: 5\n")
    result = _validate(bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "services.n1.restart" in result.stdout


def test_services(compose):
    services = compose["services"]
    assert {"postgres", *NODES, *SITES} <= services.keys()
    for name in NODES:
        svc = services[name]
        assert svc["command"] == ["fedraft", "node", "start", "--config", "/etc/fedraft/node.toml"]
        assert svc["environment"]["FEDRAFT_RAFT_PASSWORD_FILE"] == "/run/secrets/raft_password"
        assert f"{name}-data:/var/lib/fedraft" in svc["volumes"]
        assert f"./{name}.toml:/etc/fedraft/node.toml:ro" in svc["volumes"]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        targets = {s if isinstance(s, str) else s["target"] for s in svc["secrets"]}
        assert {"raft_password", "postgres_password", "ca.pem", "node.pem", "node.key",
                "audit-key.pem"} == targets
        sources = {s if isinstance(s, str) else s["source"] for s in svc["secrets"]}
        assert {f"{name}_cert", f"{name}_key"} <= sources
    for name in SITES:
        svc = services[name]
        assert svc["command"] == ["fedraft-client", "run", "--config", "/etc/fedraft/site.toml"]
        assert f"./{name}.toml:/etc/fedraft/site.toml:ro" in svc["volumes"]
    assert "tools" in services["operator"]["profiles"]
    for name, svc in services.items():
        assert "ports" not in svc, f"{name} publishes a port on the host"


def test_every_secret_and_volume_is_declared(compose):
    declared_secrets = compose["secrets"]
    declared_volumes = compose["volumes"]
    for name, svc in compose["services"].items():
        for secret in svc.get("secrets", []):
            source = secret if isinstance(secret, str) else secret["source"]
            assert source in declared_secrets, (name, source)
        for volume in svc.get("volumes", []):
            head = volume.split(":", 1)[0]
            if not head.startswith((".", "/")):
                assert head in declared_volumes, (name, head)
            else:
                assert (COMPOSE / head).exists(), (name, head)
    for secret in declared_secrets.values():
        assert secret["file"].startswith("./secrets/")
    assert "secrets/" in (COMPOSE / ".gitignore").read_text()


def test_node_configs_load_and_point_at_postgres(monkeypatch):
    monkeypatch.setenv("FEDRAFT_RAFT_PASSWORD", "x" * 32)
    configs = {n: load_node_config(COMPOSE / f"{n}.toml") for n in NODES}
    init_sql = (COMPOSE / "postgres-init.sql").read_text()
    selves = {cfg.self_addr for cfg in configs.values()}
    for name, cfg in configs.items():
        assert cfg.self_addr.id == name
        assert cfg.self_addr.admin == f"{name}:7300"
        assert set(cfg.peers) == selves - {cfg.self_addr}
        assert cfg.audit_db.startswith("postgresql+psycopg://fedraft@postgres:5432/")
        database = cfg.audit_db.rsplit("/", 1)[1]
        assert re.search(rf"CREATE DATABASE {database} OWNER fedraft;", init_sql)
        assert str(cfg.cert) == "/run/secrets/node.pem" and str(cfg.key) == "/run/secrets/node.key"
        assert str(cfg.audit_key) == "/run/secrets/audit-key.pem"
    assert len({cfg.audit_db for cfg in configs.values()}) == 3


def test_site_configs_load(compose):
    partitions = set()
    for name in SITES:
        cfg = load_site_config(COMPOSE / f"{name}.toml")
        assert cfg.site_id == name
        assert cfg.nodes == tuple(f"{n}:7200" for n in NODES)
        assert str(cfg.identity_key) == "/run/secrets/identity.pem"
        partitions.add(cfg.data["partition"])
    assert partitions == {0, 1}


def test_gpu_override_switches_site_b_to_the_cuda_image(monkeypatch):
    gpu = yaml.safe_load((COMPOSE / "compose.gpu.yaml").read_text())["services"]["site-b"]
    assert gpu["build"]["dockerfile"] == "deploy/docker/client-cuda.Dockerfile"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for key, value in gpu["environment"].items():
        monkeypatch.setenv(key, value)
    assert load_site_config(COMPOSE / "site-b.toml").device == "auto"


@pytest.mark.slow
def test_gen_secrets_writes_every_mounted_secret(tmp_path, compose):
    """Runs gen-secrets.sh with this virtualenv's fedraft (about a minute on 2 busy cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDRAFT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FEDRAFT_PYTHON"] = sys.executable
    result = subprocess.run(["sh", str(COMPOSE / "gen-secrets.sh"), "secrets"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "secrets"
    for secret in compose["secrets"].values():
        assert (tmp_path / secret["file"]).is_file(), secret["file"]
    assert len((out / "raft_password").read_text().strip()) >= 16

    from cryptography import x509

    from coordinator.audit import AuditSigner
    from coordinator.cluster import pki

    for name in NODES:
        cert = x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)
        assert pki.subject_of((out / f"{name}.pem").read_bytes())[1] == "node"
    assert pki.subject_of((out / "site-a.pem").read_bytes())[1] == "client"
    signer = AuditSigner.from_file(out / "audit-key.pem")
    assert (out / "audit-key.pub").read_text().strip() == signer.public_key_hex
    assert len(bytes.fromhex((out / "site-a-identity.pub").read_text().strip())) == 32
    # Private files stay owner-only; the rerun refuses to overwrite anything.
    assert (out / "n1.key").stat().st_mode & 0o077 == 0
    again = subprocess.run(["sh", str(COMPOSE / "gen-secrets.sh"), "secrets"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "refusing" in again.stderr
