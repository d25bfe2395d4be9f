"""TLS files the nodes would refuse are named before anything dials: one line, the cause
and the fix, exit 2; not "unreachable" after a handshake fails."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cluster import pki
from coordinator.wire import identity_problem


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pki.Identity]:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    pki.init_ca(root / "other")
    return {"operator": pki.issue(root / "ca", root / "ids", "operator", "alice"),
            "site": pki.issue(root / "ca", root / "ids", "client", "site-a"),
            "foreign": pki.issue(root / "other", root / "foreign", "operator", "mallory")}


def _problem(ident: pki.Identity, **kw: object) -> str | None:
    return identity_problem(ident.ca, ident.cert, ident.key, **kw)  # type: ignore[arg-type]


def test_a_good_identity_passes(ids: dict[str, pki.Identity]) -> None:
    assert _problem(ids["operator"], roles=("operator", "auditor")) is None
    assert _problem(ids["site"], roles=("client",)) is None


def test_each_cause_is_named(ids: dict[str, pki.Identity], tmp_path: Path) -> None:
    op, site, foreign = ids["operator"], ids["site"], ids["foreign"]
    now = dt.datetime.now(dt.UTC)
    cases = {
        "cannot read the certificate": pki.Identity(op.ca, tmp_path / "nope.pem", op.key),
        "cannot read the private key": pki.Identity(op.ca, op.cert, tmp_path / "nope.key"),
        "is not a PEM certificate (expected the federation's ca.pem)":
            pki.Identity(op.key, op.cert, op.key),
        "is not an unencrypted PEM private key": pki.Identity(op.ca, op.cert, op.cert),
        "does not belong to the certificate": pki.Identity(op.ca, op.cert, site.key),
        "was not issued by the CA": pki.Identity(op.ca, foreign.cert, foreign.key),
    }
    for expected, ident in cases.items():
        assert expected in str(_problem(ident)), expected
    assert "expired on" in str(_problem(op, now=now + dt.timedelta(days=400)))
    assert "not valid before" in str(_problem(op, now=now - dt.timedelta(days=1)))
    assert "has role 'client'; this needs 'operator'" in str(_problem(site, roles=("operator",)))


def _fedraft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_cli_names_a_foreign_certificate_instead_of_unreachable(
        ids: dict[str, pki.Identity]) -> None:
    op, foreign = ids["operator"], ids["foreign"]
    out = _fedraft("cluster", "status", "--admin", "127.0.0.1:9", "--ca", str(op.ca),
                   "--cert", str(foreign.cert), "--key", str(foreign.key))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "was not issued by the CA" in lines[0], out.stderr
    assert "unreachable" not in out.stderr


def test_one_agent_per_state_directory(tmp_path: Path) -> None:
    from client.store import StateDirBusy, lock_state_dir

    held = lock_state_dir(tmp_path / "state")
    with pytest.raises(StateDirBusy, match=r"another agent \(pid \d+\) runs on the state"):
        lock_state_dir(tmp_path / "state")
    held.close()  # the first agent ends: the next one may start
    lock_state_dir(tmp_path / "state").close()


def test_error_lines_keep_bracketed_text(capsys: pytest.CaptureFixture[str]) -> None:
    """Messages name config sections ([site], [data]); rich must not eat them as markup."""
    import typer

    from coordinator.commands.common import run
    from coordinator.ops.admin_client import Refused

    def refuse() -> None:
        raise Refused({"ok": False, "code": "bad_config", "error": "set [site] state_dir"})

    with pytest.raises(typer.Exit):
        run(refuse)
    assert "refused (bad_config): set [site] state_dir" in capsys.readouterr().err
