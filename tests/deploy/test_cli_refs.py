"""Every `fedraft` / `fedraft-client` command line in deploy/ names a real command and
real options; and the extractor/checker behind that test catches what it should."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy import clicheck

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def roots():
    return clicheck.cli_roots()


def _problems(lines, roots):
    out = []
    for line in lines:
        out += clicheck.check(line, roots)
    return out


def test_every_command_line_in_deploy_exists(roots):
    found: dict[Path, list[clicheck.CommandLine]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            found[path] = clicheck.extract(path)
    problems = _problems([line for lines in found.values() for line in lines], roots)
    assert problems == [], "\n".join(problems)

    def argvs(relative: str) -> list[tuple[str, ...]]:
        return [line.argv for line in found[DEPLOY / relative]]

    # The extractor must see the entry points in every kind of file, or the check above
    # would pass vacuously.
    node = ("fedraft", "node", "start", "--config", "/etc/fedraft/node.toml")
    site = ("fedraft-client", "run", "--config", "/etc/fedraft/site.toml")
    assert node in argvs("docker/node.Dockerfile")
    assert site in argvs("docker/client.Dockerfile")
    assert site in argvs("docker/client-cuda.Dockerfile")
    assert argvs("compose/compose.yaml").count(node) == 3
    assert argvs("compose/compose.yaml").count(site) == 2
    assert ("fedraft", "node", "start", "--config", "$(FEDRAFT_NODE_CONFIG)", "--json-logs") in argvs(
        "k8s/statefulset.yaml")
    assert site in argvs("k8s/site.yaml")
    assert node in argvs("systemd/fedraft-node.service")
    assert site in argvs("systemd/fedraft-client.service")
    guide = {line.argv[:3] for line in found[DEPLOY / "README.md"]}
    for expected in [("fedraft", "certs", "init"), ("fedraft", "certs", "issue"),
                     ("fedraft", "client", "enroll"), ("fedraft", "cluster", "status"),
                     ("fedraft", "round", "start"), ("fedraft", "audit", "verify"),
                     ("fedraft-client", "keygen", "--out"), ("fedraft", "model", "init")]:
        assert expected in guide, expected
    roles = {line.argv[3] for line in found[DEPLOY / "README.md"] if line.argv[1:3] == ("certs", "issue")}
    assert roles == {"node", "client", "operator", "auditor"}
    assert any(line.argv[1:3] == ("certs", "issue") for line in found[DEPLOY / "compose/gen-secrets.sh"])


# ------------------------------------------------------------------ the checker


@pytest.mark.parametrize("argv, complaint", [
    (("fedraft", "node", "launch"), "has no command 'launch'"),
    (("fedraft", "nodes", "start"), "has no command 'nodes'"),
    (("fedraft", "node", "start", "--confg", "n.toml"), "has no option '--confg'"),
    (("fedraft", "node", "start", "--config=n.toml", "--jsn"), "has no option '--jsn'"),
    (("fedraft-client", "run", "--config", "s.toml", "--gpu"), "has no option '--gpu'"),
    (("fedraft-client", "serve"), "has no command 'serve'"),
    (("fedraft", "certs"), "is a group; it needs a command"),
    (("fedraft", "audit", "verify", "-x"), "has no option '-x'"),
])
def test_checker_rejects(roots, argv, complaint):
    problems = clicheck.check(clicheck.CommandLine(argv, "t"), roots)
    assert len(problems) == 1 and complaint in problems[0], problems


@pytest.mark.parametrize("argv", [
    ("fedraft", "--help"),
    ("fedraft", "node", "start", "-c", "n.toml", "--log-level", "debug", "--json-logs"),
    ("fedraft", "node", "start", "--config=n.toml"),
    ("fedraft", "audit", "verify", "--no-charges", "--tolerance", "1e-6", "--db", "sqlite:///a.db"),
    ("fedraft", "round", "start", "-n", "3", "--no-wait", "--set", "compression=100"),
    ("fedraft", "model", "export", "latest", "-o", "m.safetensors"),
    ("fedraft-client", "init-model", "--task", "breast_cancer", "-o", "g.safetensors"),
    ("fedraft", "certs", "issue", "node", "n1", "--ca-dir", "ca", "--host", "-weird-but-a-value"),
])
def test_checker_accepts(roots, argv):
    assert clicheck.check(clicheck.CommandLine(argv, "t"), roots) == []


def test_shell_extraction():
    text = """
    # fedraft node start --not-checked (a comment)
    sudo -u fedraft fedraft cluster status --json | jq .leader
    install -d -g fedraft /etc/fedraft && fedraft round status;fedraft privacy ledger
    export FEDRAFT_ADMIN=a:1 && FEDRAFT_CA=ca.pem fedraft client list > sites.txt
    fedraft certs issue node n1 --ca-dir ./ca \\
        --host n1.example.org
    kubectl exec deploy/x -- sh -c 'fedraft-client keygen --out k.pem && fedraft model init g'
    /opt/fedraft/bin/fedraft-entrypoint /opt/fedraft/bin/fedraft node start -c n.toml
    """
    argvs = [line.argv for line in clicheck.commands_in_shell(text, "t")]
    assert argvs == [
        ("fedraft", "cluster", "status", "--json"),
        ("fedraft", "round", "status"),
        ("fedraft", "privacy", "ledger"),
        ("fedraft", "client", "list"),
        ("fedraft", "certs", "issue", "node", "n1", "--ca-dir", "./ca", "--host", "n1.example.org"),
        ("fedraft-client", "keygen", "--out", "k.pem"),
        ("fedraft", "model", "init", "g"),
        ("fedraft", "node", "start", "-c", "n.toml"),
    ]


def test_a_wrong_command_in_any_kind_of_deploy_file_is_caught(tmp_path, roots):
    files = {
        "x.Dockerfile": 'FROM scratch\nCMD ["fedraft", "node", "start", "--cfg", "/n.toml"]\n',
        "y.Dockerfile": 'FROM scratch\nHEALTHCHECK --interval=5s CMD fedraft cluster stats\n',
        "compose.yaml": "services:\n  n1:\n    image: x\n    command: fedraft node begin\n",
        "sts.yaml": ("apiVersion: apps/v1\nkind: StatefulSet\nspec:\n  template:\n    spec:\n"
                     "      containers:\n        - name: n\n          image: x\n"
                     "          args: [fedraft, node, start, --configuration, a]\n"),
        "probe.yaml": ("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n    - name: n\n"
                       "      image: x\n      readinessProbe:\n        exec:\n"
                       "          command: [fedraft, cluster, health]\n"),
        "n.service": "[Service]\nExecStart=-/opt/fedraft/bin/fedraft-client run --conf s.toml\n",
        "guide.md": "Text.\n\n```bash\nfedraft certs issue node n1 --ca /ca\n```\n\n```toml\n[x]\n```\n",
        "script.sh": "#!/bin/sh\nset -eu\nfedraft certs init \"$1\" --force\n",
    }
    bad = {}
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        lines = clicheck.extract(path)
        assert len(lines) == 1, (name, lines)
        bad[name] = _problems(lines, roots)
    assert {name: len(p) for name, p in bad.items()} == {name: 1 for name in files}, bad
    assert "'--cfg'" in bad["x.Dockerfile"][0]
    assert "'stats'" in bad["y.Dockerfile"][0]
    assert "'begin'" in bad["compose.yaml"][0]
    assert "'--configuration'" in bad["sts.yaml"][0]
    assert "'health'" in bad["probe.yaml"][0]
    assert "'--conf'" in bad["n.service"][0]
    assert "'--ca'" in bad["guide.md"][0]
    assert "'--force'" in bad["script.sh"][0]
