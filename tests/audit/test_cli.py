"""Auditor CLI and offline bundles, through typer's CliRunner, with exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import text
from typer.testing import CliRunner

from coordinator.audit import AuditSigner, AuditStore, Bundle
from coordinator.audit.cli import audit_app

from .conftest import Backend, Built, build_log, toy_epsilon

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def logged(tmp_path: Path, signer: AuditSigner) -> tuple[str, Built]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with AuditStore(url, signer=signer, checkpoint_every=8) as store:
        built = build_log(store, blob_dir=tmp_path / "blobs", accountant=toy_epsilon)
    return url, built


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(audit_app, list(args), env=env)


def test_rounds_table_and_json(logged: tuple[str, Built]) -> None:
    url, _ = logged
    result = run("rounds", "--db", url)
    assert result.exit_code == 0, result.output
    assert "committed" in result.stdout and "aborted" not in result.stdout  # r3 retried fine
    result = run("rounds", "--db", url, "--since", "3", "--until", "5", "--json")
    rows = json.loads(result.stdout)
    assert [r["round"] for r in rows] == [3, 4, 5] and rows[0]["attempts"] == 2
    rows = json.loads(run("rounds", "--db", url, "--site", "site-00", "--json").stdout)
    assert [r["round"] for r in rows] == [2, 4, 6, 8, 10, 12]


def test_database_from_environment(logged: tuple[str, Built]) -> None:
    url, _ = logged
    result = run("rounds", "--json", env={"FEDRAFT_AUDIT_DB": url})
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 12


def test_show_round(logged: tuple[str, Built]) -> None:
    url, built = logged
    result = run("show", "3", "--db", url)
    assert result.exit_code == 0, result.output
    assert "stage masked_input timed out" in result.stdout and built.versions[3] in result.stdout
    detail = json.loads(run("show", "3", "--db", url, "--json").stdout)
    assert [a["status"] for a in detail["attempts"]] == ["aborted", "committed"]
    assert set(detail["attempts"][1]["charges"]) == {"site-01", "site-02", "site-03", "site-04"}
    missing = run("show", "99", "--db", url)
    assert missing.exit_code == 1 and "not in the log" in missing.stderr


def test_model_lineage(logged: tuple[str, Built]) -> None:
    url, built = logged
    result = run("model", built.versions[4][:12], "--db", url, "--json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.stdout)
    assert [e["payload"]["version"] for e in chain] == built.versions[4::-1]
    assert run("model", built.versions[4], "--db", url).exit_code == 0
    unknown = run("model", "f" * 64, "--db", url)
    assert unknown.exit_code == 1 and "no model version" in unknown.stderr


def test_verify_exit_codes(logged: tuple[str, Built], signer: AuditSigner,
                           other_signer: AuditSigner, tmp_path: Path) -> None:
    url, built = logged
    ok = run("verify", "--db", url, "--key", signer.public_key_hex, "--blobs",
             str(tmp_path / "blobs"), "--accountant", "tests.audit.conftest:toy_epsilon")
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.stdout and "13 blobs" in ok.stdout and "48 privacy charges" in ok.stdout
    report = json.loads(run("verify", "--db", url, "--no-charges", "--json").stdout)
    assert report["ok"] is True and report["counts"]["entries"] > 30
    assert report["counts"]["charges"] == 0 and report["counts"]["charges_unchecked"] == 48
    wrong_key = run("verify", "--db", url, "--no-charges", "--key", other_signer.public_key_hex)
    assert wrong_key.exit_code == 1 and "seq 0" in wrong_key.stdout

    target = built.seq_of_round[5]
    store = AuditStore(url, migrate=False)
    with store.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_entries_no_update"))
        conn.execute(text("UPDATE audit_entries SET payload = replace(payload, "
                          "'\"survivors\":[\"site-01\"', '\"survivors\":[\"site-09\"') "
                          "WHERE seq = :s"), {"s": target})
    store.close()
    bad = run("verify", "--db", url, "--no-charges")
    assert bad.exit_code == 1
    assert f"first bad entry is seq {target}" in bad.stdout
    bad_json = json.loads(run("verify", "--db", url, "--no-charges", "--json").stdout)
    assert bad_json["ok"] is False and bad_json["first_bad_seq"] == target


def test_usage_errors_exit_2(tmp_path: Path, logged: tuple[str, Built]) -> None:
    url, _ = logged
    assert run("verify").exit_code == 2
    assert run("verify", "--db", url, "--bundle", str(tmp_path)).exit_code == 2
    assert run("verify", "--db", f"sqlite:///{tmp_path / 'absent.db'}").exit_code == 2
    unreachable = run("verify", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert unreachable.exit_code == 2 and "cannot open" in unreachable.stderr
    assert run("verify", "--db", "nonsense://x").exit_code == 2
    empty = tmp_path / "other.db"
    AuditStore(f"sqlite:///{tmp_path / 'x.db'}").close()
    import sqlite3

    sqlite3.connect(empty).execute("create table t (x int)").connection.commit()
    assert run("rounds", "--db", f"sqlite:///{empty}").exit_code == 2
    assert run("verify", "--bundle", str(tmp_path)).exit_code == 2  # not a bundle
    assert run("verify", "--db", url, "--key", "zz").exit_code == 2
    assert run("verify", "--db", url, "--accountant", "no_such_module:f").exit_code == 2
    assert run("verify", "--db", url, "--no-charges", "--accountant", "math:fsum").exit_code == 2
    assert run("rounds", "--db", url, "--since", "x").exit_code == 2


def test_export_and_offline_verify(logged: tuple[str, Built], signer: AuditSigner,
                                   tmp_path: Path) -> None:
    url, built = logged
    out = tmp_path / "bundle"
    result = run("export", "--db", url, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "entries.jsonl", "checkpoints.jsonl", "keys.json", "manifest.json"}
    keys = json.loads((out / "keys.json").read_text())
    assert keys[0]["public_key"] == signer.public_key_hex
    ok = run("verify", "--bundle", str(out), "--key", signer.public_key_hex,
             "--blobs", str(tmp_path / "blobs"), "--accountant", "tests.audit.conftest:toy_epsilon")
    assert ok.exit_code == 0, ok.output
    rows = json.loads(run("rounds", "--bundle", str(out), "--json").stdout)
    assert len(rows) == 12
    assert run("model", built.versions[12][:8], "--bundle", str(out)).exit_code == 0
    # a bundle can be re-exported and still verifies
    again = tmp_path / "again"
    assert run("export", "--bundle", str(out), "-o", str(again)).exit_code == 0
    assert Bundle(again).verify(genesis_key=signer.public_key).ok


def _bundle(url: str, tmp_path: Path) -> tuple[Path, list[str]]:
    out = tmp_path / "b"
    assert run("export", "--db", url, "-o", str(out)).exit_code == 0
    return out, (out / "entries.jsonl").read_text().splitlines(keepends=True)


def test_bundle_edits_are_named(logged: tuple[str, Built], tmp_path: Path) -> None:
    url, built = logged
    out, lines = _bundle(url, tmp_path)
    path = out / "entries.jsonl"
    target = built.seq_of_round[6]

    edited = list(lines)
    entry = json.loads(edited[target])
    entry["payload"]["metrics"]["accuracy"] = 1.0
    edited[target] = json.dumps(entry) + "\n"
    path.write_text("".join(edited))
    report = Bundle(out).verify()
    assert report.first_bad_seq == target and any("changed since export" in w
                                                  for w in report.warnings)

    swapped = list(lines)
    swapped[5], swapped[9] = swapped[9], swapped[5]
    path.write_text("".join(swapped))
    result = run("verify", "--bundle", str(out), "--no-charges", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["first_bad_seq"] == 5

    path.write_text("".join(lines[:-2]))  # tail cut above the last checkpoint
    report = Bundle(out).verify()
    assert not report.ok and report.first_bad_seq == len(lines) - 2

    garbled = list(lines)
    garbled[7] = "{not json\n"
    path.write_text("".join(garbled))
    report = Bundle(out).verify()
    assert not report.ok and report.first_bad_seq == 7


def test_report_html(logged: tuple[str, Built], signer: AuditSigner, tmp_path: Path) -> None:
    url, _ = logged
    target = tmp_path / "report.html"
    result = run("report", "--db", url, "-o", str(target), "--key", signer.public_key_hex)
    assert result.exit_code == 0, result.output
    doc = target.read_text()
    assert doc.startswith("<!DOCTYPE html>") and doc.count("<svg") >= 3
    assert "accuracy by round" in doc and "cumulative epsilon by site" in doc
    assert "log verifies" in doc and "site-05" in doc
    assert "http" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")
    meta = run("report", "--db", url, "-o", str(target), "--key", signer.public_key_hex,
               "--json")
    assert meta.exit_code == 0 and json.loads(meta.stdout)["verified"] is True


def test_report_exits_1_on_a_log_that_fails(logged: tuple[str, Built], signer: AuditSigner,
                                            tmp_path: Path) -> None:
    import sqlite3

    url, _ = logged
    db = url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:  # forge a payload behind the store's back
        conn.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
        conn.execute("UPDATE audit_entries SET payload = replace(payload, 'site-05', 'site-99') "
                     "WHERE seq = (SELECT max(seq) FROM audit_entries WHERE payload LIKE "
                     "'%site-05%')")
    result = run("report", "--db", url, "-o", str(tmp_path / "bad.html"), "--key",
                 signer.public_key_hex, "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["verified"] is False
    assert "FAILS verification" in (tmp_path / "bad.html").read_text() or \
        "fails" in (tmp_path / "bad.html").read_text().lower()


def test_cli_on_both_databases(backend: Backend, signer: AuditSigner, tmp_path: Path) -> None:
    store = backend.open(signer=signer, checkpoint_every=8)
    build_log(store)
    result = run("verify", "--db", backend.cli_url, "--key", signer.public_key_hex,
                 "--no-charges")
    assert result.exit_code == 0, result.output
    assert len(json.loads(run("rounds", "--db", backend.cli_url, "--json").stdout)) == 12
    out = tmp_path / "bundle"
    assert run("export", "--db", backend.cli_url, "-o", str(out)).exit_code == 0
    assert run("verify", "--bundle", str(out), "--key", signer.public_key_hex,
               "--no-charges").exit_code == 0
    # without --key the report is written but says nothing pinned the signer: exit 3
    assert run("report", "--db", backend.cli_url, "-o", str(tmp_path / "r.html")).exit_code == 3
    assert run("report", "--db", backend.cli_url, "-o", str(tmp_path / "r.html"), "--key",
               signer.public_key_hex).exit_code == 0


def test_accountant_mismatch_fails(logged: tuple[str, Built]) -> None:
    url, built = logged
    result = run("verify", "--db", url, "--accountant", "math:fsum", "--json")
    # math.fsum takes one argument, not (history, delta): every charge fails to recompute,
    # and that is reported, not crashed
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_bad_seq"] == built.seq_of_round[1]
    _ = toy_epsilon


def test_markup_in_recorded_text_is_printed_verbatim(tmp_path: Path, signer: AuditSigner) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    with AuditStore(url, signer=signer) as store:
        store.append("round_opened", {"round": 1, "attempt": 0, "term": 1, "base": "a" * 64,
                                      "participants": ["[red]", "[/]"], "config_digest": "x"},
                     1)
        store.append("round_aborted", {"round": 1, "attempt": 0, "term": 1,
                                       "reason": "[/] closed [bold]early"}, 2)
    shown = run("show", "1", "--db", url)
    assert shown.exit_code == 0, shown.output
    assert "[/] closed [bold]early" in shown.stdout and "[red], [/]" in shown.stdout
    assert run("rounds", "--db", url).exit_code == 0
    assert run("verify", "--db", url, "--key", signer.public_key_hex).exit_code == 0


def _write_head(store_url: str, signer: AuditSigner, path: Path) -> dict:
    with AuditStore(store_url, signer=signer) as store:
        head = store.signed_head()
    assert head is not None
    path.write_text(json.dumps({"audit_head": head.to_dict()}))
    return head.to_dict()


def test_verify_pins_the_signer_or_says_it_could_not(
        logged: tuple[str, Built], signer: AuditSigner, other_signer: AuditSigner,
        tmp_path: Path) -> None:
    """No --key and no --head: exit 3, not 0. The cluster's signed head pins the signer by
    its key id, so a log re-signed under another key fails against it."""
    url, _ = logged
    unpinned = run("verify", "--db", url, "--no-charges")
    assert unpinned.exit_code == 3 and "UNPINNED" in unpinned.stdout
    head_file = tmp_path / "head.json"
    _write_head(url, signer, head_file)
    pinned = run("verify", "--db", url, "--no-charges", "--head", str(head_file))
    assert pinned.exit_code == 0, pinned.output
    assert json.loads(run("verify", "--db", url, "--no-charges", "--head", str(head_file),
                          "--json").stdout)["signer_pinned"] is True
    forged_url = f"sqlite:///{tmp_path / 'forged.db'}"
    with AuditStore(forged_url, signer=other_signer, checkpoint_every=8) as forged:
        build_log(forged, blob_dir=tmp_path / "blobs2", accountant=toy_epsilon)
    assert run("verify", "--db", forged_url, "--no-charges").exit_code == 3
    against = run("verify", "--db", forged_url, "--no-charges", "--head", str(head_file))
    assert against.exit_code == 1
    assert "re-signed" in against.stdout or "do not match" in against.stdout


def test_a_truncated_tail_with_its_checkpoints_deleted_fails_against_the_head(
        logged: tuple[str, Built], signer: AuditSigner, tmp_path: Path) -> None:
    url, _ = logged
    head_file = tmp_path / "head.json"
    head = _write_head(url, signer, head_file)
    store = AuditStore(url, migrate=False)
    with store.engine.begin() as conn:
        for table in ("audit_entries", "audit_checkpoints"):
            conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_delete"))
        conn.execute(text("DELETE FROM audit_entries WHERE seq >= :k"),
                     {"k": head["tree_size"] - 3})
        conn.execute(text("DELETE FROM audit_checkpoints"))
    store.close()
    assert run("verify", "--db", url, "--no-charges").exit_code == 3  # consistent, unpinned
    cut = run("verify", "--db", url, "--no-charges", "--head", str(head_file))
    assert cut.exit_code == 1 and "tail deleted" in cut.stdout
    assert f"first bad entry is seq {head['tree_size'] - 3}" in cut.stdout


def test_an_unusable_head_is_a_usage_error(logged: tuple[str, Built], tmp_path: Path) -> None:
    url, _ = logged
    assert run("verify", "--db", url, "--head", str(tmp_path / "absent.json")).exit_code == 2
    (tmp_path / "bad.json").write_text('{"audit_head": {"tree_size": 3}}')
    bad = run("verify", "--db", url, "--head", str(tmp_path / "bad.json"))
    assert bad.exit_code == 2 and "lacks field" in bad.stderr
    (tmp_path / "none.json").write_text('{"audit_head": null}')
    assert run("verify", "--db", url, "--head", str(tmp_path / "none.json")).exit_code == 2


def test_read_commands_verify_what_they_show(logged: tuple[str, Built], signer: AuditSigner,
                                             tmp_path: Path) -> None:
    url, built = logged
    pinned = run("rounds", "--db", url, "--key", signer.public_key_hex, "--json")
    assert pinned.exit_code == 0 and "not pinned" not in pinned.stderr
    unpinned = run("rounds", "--db", url, "--json")
    assert unpinned.exit_code == 0 and "signer not pinned" in unpinned.stderr
    latest = json.loads(run("model", "latest", "--db", url, "--json").stdout)
    assert latest[0]["payload"]["version"] == built.versions[-1]
    assert latest[-1]["kind"] == "model_genesis"
    # a forged survivor list: nothing is shown, the failure is named, exit 1
    import sqlite3

    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:  # behind the store's back
        conn.execute("DROP TRIGGER IF EXISTS audit_entries_no_update")
        conn.execute("UPDATE audit_entries SET payload = replace(payload, '\"survivors\":[\"site-01\"', "
                     "'\"survivors\":[\"site-09\"') WHERE seq = ?", (built.seq_of_round[5],))
    for args in (("rounds",), ("show", "1"), ("model", "latest")):
        refused = run(*args, "--db", url)
        assert refused.exit_code == 1, (args, refused.output)
        assert "FAILS verification at seq" in refused.stderr and refused.stdout == ""
    shown = run("rounds", "--db", url, "--no-verify", "--json")
    assert shown.exit_code == 0 and "not verified" in shown.stderr and json.loads(shown.stdout)
