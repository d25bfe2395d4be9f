"""Enrollment bundles: built by the operator, checked and unpacked by the site.

Unit tests of coordinator/bundle.py and client/bundle.py, then one real federation:
enroll with `fedraft client enroll --bundle`, import with `fedraft-client import`, run
the agent on the imported site.toml for one round, revoke it and see it refused.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from client import enroll as site_bundle
from client.cli import app as client_app
from client.config import load_site_config
from coordinator import wire
from coordinator.cli import app as operator_app
from coordinator.cluster import pki
from coordinator.ops import enroll as op_bundle

SITE = "hospital-a"
NODES = ["127.0.0.1:7200", "coord2.example.org:7200", "[::1]:7200"]


def _write_identity(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def pki_env(tmp_path):
    """A CA, a site identity key, and a bundle made for it, written to disk."""
    ca_dir = tmp_path / "ca"
    pki.init_ca(ca_dir)
    key = _write_identity(tmp_path / "identity.pem")
    made = op_bundle.build_bundle(ca_dir, SITE, wire.public_key_hex(key), NODES, 3.0, 1e-5)
    path = tmp_path / "bundle.json"
    op_bundle.write_bundle(path, made)
    return {"root": tmp_path, "ca_dir": ca_dir, "key": key, "identity": tmp_path / "identity.pem",
            "made": made, "bundle": path}


def _tampered(env: dict, tmp_path: Path, **fields: str) -> Path:
    path = tmp_path / f"tampered-{len(list(tmp_path.glob('tampered-*')))}.json"
    path.write_text(json.dumps(env["made"] | fields))
    return path


def test_round_trip_writes_a_loadable_site(pki_env):
    env = pki_env
    site_dir = env["root"] / "site"
    done = site_bundle.import_bundle(env["bundle"], env["identity"], site_dir, task="breast_cancer",
                                     partition=1, num_partitions=3)
    cfg = load_site_config(site_dir / "site.toml")
    assert cfg == done.config
    assert cfg.site_id == SITE and cfg.nodes == tuple(NODES) and cfg.task == "breast_cancer"
    assert cfg.data == {"partition": 1, "num_partitions": 3}
    assert cfg.identity_key == env["identity"].resolve()
    assert cfg.ca.read_bytes() == (env["ca_dir"] / "ca.pem").read_bytes()
    assert cfg.state_dir == (site_dir / "state").resolve()
    assert pki.subject_of(cfg.cert.read_bytes()) == (SITE, "client")
    # keys 0600 (the bundle itself too: it carries the TLS key); certificates readable
    assert stat.S_IMODE(cfg.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(env["bundle"].stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.cert.stat().st_mode) == 0o644
    assert sorted(os.listdir(site_dir)) == sorted(["ca.pem", f"{SITE}.pem", f"{SITE}.key", "site.toml"])
    assert done.ca_sha256 == op_bundle.ca_fingerprint((env["ca_dir"] / "ca.pem").read_bytes())
    assert "epsilon 3" in (site_dir / "site.toml").read_text()


def test_bundle_never_holds_the_ca_key_or_the_identity_key(pki_env):
    env = pki_env
    text = env["bundle"].read_text()
    ca_key = (env["ca_dir"] / "ca.key").read_text().strip()
    assert ca_key not in text and "ca_key" not in text
    assert env["identity"].read_text().strip() not in text
    assert json.loads(text)["public_key"] == wire.public_key_hex(env["key"])
    assert text.count("PRIVATE KEY-----") == 2  # the TLS key's BEGIN and END lines only


def _refused(env: dict, bundle: Path, match: str, identity: Path | None = None, **kw) -> None:
    site_dir = env["root"] / "site"
    before = _tree(env["root"])
    with pytest.raises(site_bundle.BundleError, match=match):
        site_bundle.import_bundle(bundle, identity or env["identity"], site_dir,
                                  task="breast_cancer", **kw)
    assert not site_dir.exists()
    assert _tree(env["root"]) == before


def test_cert_from_another_ca_refused(pki_env, tmp_path):
    env = pki_env
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    forged = pki.issue(other, tmp_path / "forged", "client", SITE)
    bundle = _tampered(env, tmp_path, cert_pem=forged.cert.read_text(), key_pem=forged.key.read_text())
    _refused(env, bundle, "does not chain")
    # the reverse swap: the right certificate presented with another CA
    _refused(env, _tampered(env, tmp_path, ca_pem=(other / "ca.pem").read_text()), "does not chain")


def test_tampered_certificate_bytes_refused(pki_env, tmp_path):
    env = pki_env
    cert = x509.load_pem_x509_certificate(env["made"]["cert_pem"].encode())
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    body = base64.encodebytes(bytes(der)).decode()
    pem = f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"
    _refused(env, _tampered(env, tmp_path, cert_pem=pem), "does not chain|not PEM")


def test_wrong_common_name_or_role_refused(pki_env, tmp_path):
    env = pki_env
    other = pki.issue(env["ca_dir"], tmp_path / "b", "client", "hospital-b")
    _refused(env, _tampered(env, tmp_path, cert_pem=other.cert.read_text(),
                            key_pem=other.key.read_text()), "names hospital-b")
    op = pki.issue(env["ca_dir"], tmp_path / "op", "operator", SITE)
    _refused(env, _tampered(env, tmp_path, cert_pem=op.cert.read_text(), key_pem=op.key.read_text()),
             "role is operator")


def test_tls_key_of_another_certificate_refused(pki_env, tmp_path):
    env = pki_env
    other = pki.issue(env["ca_dir"], tmp_path / "x", "client", SITE)
    _refused(env, _tampered(env, tmp_path, key_pem=other.key.read_text()), "does not belong")


def test_wrong_identity_key_refused(pki_env, tmp_path):
    env = pki_env
    _write_identity(tmp_path / "stranger.pem")
    _refused(env, env["bundle"], "not the one enrolled", identity=tmp_path / "stranger.pem")
    (tmp_path / "not-a-key.pem").write_text("hello")
    _refused(env, env["bundle"], "not an unencrypted PEM", identity=tmp_path / "not-a-key.pem")


def test_malformed_bundles_refused(pki_env, tmp_path):
    env = pki_env
    ca_key = (env["ca_dir"] / "ca.key").read_text()
    _refused(env, _tampered(env, tmp_path, ca_key=ca_key), "unexpected fields: ca_key")
    _refused(env, _tampered(env, tmp_path, format="zip"), "not a fedraft site bundle")
    _refused(env, _tampered(env, tmp_path, site="../etc"), "not a valid site id")
    bad = tmp_path / "garbage.json"
    bad.write_bytes(b"\x00\x01not json")
    _refused(env, bad, "not JSON")
    _refused(env, env["bundle"], "not the pinned one", ca_sha256="00" * 32)
    with pytest.raises(site_bundle.BundleError, match="exactly one"):
        site_bundle.import_bundle(env["bundle"], env["identity"], env["root"] / "site")


def test_a_flower_app_that_cannot_load_is_refused_before_ready(pki_env):
    env = pki_env
    site_dir = env["root"] / "site"
    for ref, why in (("nosuchmod:app", "cannot import module 'nosuchmod'"),
                     ("client.examples.flower_breast_cancer:nope", "no attribute 'nope'"),
                     ("client.examples.flower_breast_cancer", "must look like")):
        with pytest.raises(site_bundle.BundleError, match=why):
            site_bundle.import_bundle(env["bundle"], env["identity"], site_dir, flower_app=ref)
        assert not site_dir.exists()
    done = site_bundle.import_bundle(env["bundle"], env["identity"], site_dir,
                                     flower_app="client.examples.flower_breast_cancer:app")
    assert "flower_app" in done.config_path.read_text()


def test_existing_files_kept_unless_forced(pki_env):
    env = pki_env
    site_dir = env["root"] / "site"
    site_bundle.import_bundle(env["bundle"], env["identity"], site_dir, task="breast_cancer")
    (site_dir / "site.toml").write_text((site_dir / "site.toml").read_text() + "\n# my edit\n")
    before = _tree(site_dir)
    with pytest.raises(site_bundle.BundleError, match="--force"):
        site_bundle.import_bundle(env["bundle"], env["identity"], site_dir, task="breast_cancer")
    assert _tree(site_dir) == before
    # rotation: a new TLS certificate for the same enrolled key replaces the old one
    rotated = op_bundle.build_bundle(env["ca_dir"], SITE, wire.public_key_hex(env["key"]), NODES,
                                     3.0, 1e-5)
    op_bundle.write_bundle(env["root"] / "rotated.json", rotated)
    site_bundle.import_bundle(env["root"] / "rotated.json", env["identity"], site_dir,
                              task="breast_cancer", force=True)
    assert (site_dir / f"{SITE}.pem").read_text() == rotated["cert_pem"]
    assert stat.S_IMODE((site_dir / f"{SITE}.key").stat().st_mode) == 0o600
    assert (site_dir / "site.toml.bak").read_text().endswith("# my edit\n")
    assert not list(site_dir.glob(".fedraft-import-*"))


def test_import_cli_exit_codes(pki_env):
    env = pki_env
    runner = CliRunner()
    site_dir = env["root"] / "site"
    stranger = env["root"] / "stranger.pem"
    _write_identity(stranger)
    app = "client.examples.flower_breast_cancer:app"
    bad = runner.invoke(client_app, ["import", str(env["bundle"]), "--identity-key", str(stranger),
                                     "--dir", str(site_dir), "--flower-app", app, "--json"])
    assert bad.exit_code == 2 and json.loads(bad.stdout.splitlines()[0])["ok"] is False
    assert not site_dir.exists()
    ok = runner.invoke(client_app, ["import", str(env["bundle"]), "--identity-key",
                                    str(env["identity"]), "--dir", str(site_dir), "--flower-app",
                                    app, "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["site"] == SITE and out["nodes"] == NODES
    assert out["budget"] == {"epsilon": 3.0, "delta": 1e-5}
    assert load_site_config(site_dir / "site.toml").flower_app == app


def test_enroll_bundle_flags_checked_before_enrolling(pki_env):
    """Nothing reaches the cluster (there is none at 127.0.0.1:9) when the bundle cannot be made."""
    env = pki_env
    runner = CliRunner()
    op = pki.issue(env["ca_dir"], env["root"] / "op", "operator", "alice")
    creds = ["--admin", "127.0.0.1:9", "--ca", str(op.ca), "--cert", str(op.cert), "--key",
             str(op.key)]
    pub = wire.public_key_hex(Ed25519PrivateKey.generate())
    out = env["root"] / "new.json"
    no_ca = runner.invoke(operator_app, ["client", "enroll", "s1", "--public-key", pub, "--bundle",
                                         str(out), "--fleet", "h:1", *creds])
    assert no_ca.exit_code == 2 and "--ca-dir" in no_ca.output
    wildcard = runner.invoke(operator_app, ["client", "enroll", "s1", "--public-key", pub,
                                            "--bundle", str(out), "--ca-dir", str(env["ca_dir"]),
                                            "--fleet", "0.0.0.0:7200", *creds])
    assert wildcard.exit_code == 2 and "bind-all" in wildcard.output
    exists = runner.invoke(operator_app, ["client", "enroll", "s1", "--public-key", pub, "--bundle",
                                          str(env["bundle"]), "--ca-dir", str(env["ca_dir"]),
                                          "--fleet", "h:1", *creds])
    assert exists.exit_code == 2 and "refusing to overwrite" in exists.output
    assert not out.exists()


# ---------------------------------------------------------------- a real federation


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, env=env,
                          timeout=120)


def test_enroll_import_run_revoke(tmp_path, make_cluster):
    cluster = make_cluster()  # the genesis model of breast_cancer, no site yet
    op = cluster.operator
    env = {**cluster.env, "FEDRAFT_ADMIN": ",".join(n.admin for n in cluster.nodes),
           "FEDRAFT_CA": str(op.ca), "FEDRAFT_CERT": str(op.cert), "FEDRAFT_KEY": str(op.key)}
    site_dir = cluster.root / "sites" / SITE
    site_dir.mkdir(parents=True)
    keygen = _run(["client", "keygen", "-o", str(site_dir / "identity.pem")], env)
    assert keygen.returncode == 0, keygen.stderr
    pub = keygen.stdout.strip()

    bundle = tmp_path / "hospital-a.bundle.json"
    enroll = _run(["coordinator", "client", "enroll", SITE, "--public-key", pub, "--epsilon",
                   "5", "--bundle", str(bundle), "--ca-dir", str(cluster.ca_dir), "--json"], env)
    assert enroll.returncode == 0, enroll.stderr
    enrolled = json.loads(enroll.stdout.strip().splitlines()[-1])
    assert sorted(enrolled["nodes"]) == sorted(n.fleet for n in cluster.nodes)  # from status
    again = _run(["coordinator", "client", "enroll", SITE, "--public-key", pub, "--bundle",
                  str(tmp_path / "again.json"), "--ca-dir", str(cluster.ca_dir)], env)
    assert again.returncode == 1 and not (tmp_path / "again.json").exists()

    imported = _run(["client", "import", str(bundle), "--identity-key",
                     str(site_dir / "identity.pem"), "--dir", str(site_dir), "--task",
                     "breast_cancer", "--ca-sha256", enrolled["ca_sha256"], "--json"], env)
    assert imported.returncode == 0, imported.stderr
    config = Path(json.loads(imported.stdout.strip().splitlines()[-1])["config"])
    assert config == site_dir / "site.toml"
    assert json.loads(imported.stdout.strip().splitlines()[-1])["budget"]["epsilon"] == 5.0

    cluster.start_site(SITE, config)
    cluster.admin.call("Train", {"rounds": 1, "config": {
        "fraction": 1.0, "min_clients": 1, "secure_aggregation": False, "compression": 1.0,
        "local_epochs": 1, "batch_size": 16, "lr": 0.1, "collect_timeout_s": 30.0,
        "online_wait_s": 30.0}})
    st = cluster.wait_round(1, timeout=120)
    committed = st["history"]["1"]["committed"]
    assert committed is not None and SITE in committed["survivors"]
    assert cluster.site_procs[SITE].alive

    # rotation: a fresh TLS certificate for the enrolled key and budget
    rotated = _run(["coordinator", "client", "bundle", SITE, "--bundle",
                    str(tmp_path / "rotated.json"), "--ca-dir", str(cluster.ca_dir), "--json"], env)
    assert rotated.returncode == 0, rotated.stderr
    new = json.loads((tmp_path / "rotated.json").read_text())
    old = json.loads(bundle.read_text())
    assert new["public_key"] == old["public_key"] and new["cert_pem"] != old["cert_pem"]
    assert new["budget"] == {"epsilon": 5.0, "delta": 1e-5}

    revoke = _run(["coordinator", "client", "revoke", SITE, "--json"], env)
    assert revoke.returncode == 0, revoke.stderr
    # the running agent's next poll is refused and it stops, saying why
    agent = cluster.site_procs[SITE].popen
    assert agent is not None
    assert agent.wait(timeout=60) == 1
    assert "revoked" in (site_dir / "agent.log").read_text()
    # and the imported material itself is refused on every node
    cfg = load_site_config(config)
    tls = (cfg.ca.read_bytes(), cfg.cert.read_bytes(), cfg.key.read_bytes())
    ident = serialization.load_pem_private_key(cfg.identity_key.read_bytes(), None)
    for node in cluster.nodes:
        ch = wire.Channel(node.fleet, *tls)
        deadline = time.monotonic() + 10  # a follower applies the revocation a moment later
        while True:
            reply = ch.call(wire.FLEET_SERVICE, "Poll",
                            wire.sign({"site": SITE, "wait": 0}, ident), timeout=10)  # type: ignore[arg-type]
            if reply.get("code") == "revoked" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ch.close()
        assert reply["ok"] is False and reply["code"] == "revoked", (node.id, reply)
    rotate = _run(["coordinator", "client", "bundle", SITE, "--bundle", str(tmp_path / "r.json"),
                   "--ca-dir", str(cluster.ca_dir)], env)
    assert rotate.returncode == 1 and "revoked" in rotate.stderr
