"""``fedraft audit serve`` in a real headless Chromium (Debian's), driven by Playwright.

The server runs as the CLI runs it (a subprocess, mutual TLS, a free port), and what the
pages show is held against what ``fedraft audit ... --json`` prints for the same log.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Error, Page, sync_playwright
from sqlalchemy import text
from typer.testing import CliRunner

from coordinator.audit import AuditSigner, AuditStore, Entry
from coordinator.audit.cli import audit_app
from coordinator.audit.console import Verifier
from coordinator.audit.console.data import runs_from_entries
from coordinator.cluster import pki

from .conftest import Built, build_log, toy_epsilon

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200"})


@dataclass
class Pki:
    ca: Path
    auditor: pki.Identity
    operator: pki.Identity
    foreign_auditor: pki.Identity  # role auditor, but signed by another CA


@dataclass
class Log:
    url: str
    path: Path
    built: Built


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    pki.init_ca(base / "ca")
    pki.init_ca(base / "other-ca", name="not the federation")
    return Pki(ca=base / "ca" / "ca.pem",
               auditor=pki.issue(base / "ca", base / "certs", "auditor", "alice"),
               operator=pki.issue(base / "ca", base / "certs", "operator", "bob"),
               foreign_auditor=pki.issue(base / "other-ca", base / "other", "auditor", "mallory"))


def make_log(path: Path, signer: AuditSigner) -> Log:
    """Two runs (one finished, one stopped) around six rounds charged to five sites."""
    url = f"sqlite:///{path}"
    with AuditStore(url, signer=signer, checkpoint_every=8) as store:
        store.append("training_requested", {"rounds": 6, "target_round": 6,
                                             "config_digest": "c" * 64, "config": {"lr": 0.1},
                                             "operator": "bob"}, 1)
        built = build_log(store, rounds=6, start_index=2, accountant=toy_epsilon)
        head = store.head()
        assert head is not None
        store.append("training_requested", {"rounds": 2, "target_round": 8,
                                             "config_digest": "d" * 64, "config": {"lr": 0.05},
                                             "operator": "bob"}, head.raft_index + 1)
        store.append("training_stopped", {"target_round": 8, "reason": "operator request",
                                           "operator": "bob"}, head.raft_index + 2)
    return Log(url, path, built)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory, signer: AuditSigner) -> Log:
    return make_log(tmp_path_factory.mktemp("log") / "node.db", signer)


def cli_json(*args: str) -> Any:
    result = runner.invoke(audit_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def start_server(log: Log, certs: Pki, *extra: str) -> Iterator[str]:
    """Run ``fedraft audit serve`` on a free port; yield its URL; stop it by its pid."""
    fedraft = Path(sys.executable).with_name("fedraft")
    command = [str(fedraft) if fedraft.exists() else shutil.which("fedraft") or "fedraft",
               "audit", "serve", "--db", log.url, "--ca", str(certs.ca),
               "--cert", str(certs.auditor.cert), "--key-file", str(certs.auditor.key),
               "--host", "127.0.0.1", "--port", "0", "--json", *extra]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready and proc.stdout else ""
        if not line:
            proc.kill()
            pytest.fail(f"the console did not start: {proc.communicate()[1][-2000:]}")
        announced = json.loads(line)
        assert announced["url"].startswith("https://127.0.0.1:")
        yield announced["url"]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(scope="module")
def server(log: Log, certs: Pki, signer: AuditSigner) -> Iterator[str]:
    yield from start_server(log, certs, "--key", signer.public_key_hex)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (make setup "
                    "installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def context_for(browser: Browser, url: str, identity: pki.Identity | None) -> BrowserContext:
    """A browser profile that presents ``identity``'s certificate to the console (if any).

    The console's own certificate comes from the federation CA, which this browser was not
    told to trust, hence ignore_https_errors; the client side is what is under test here.
    """
    certificates: list[Any] = []
    if identity is not None:
        certificates = [{"origin": url.rstrip("/"), "certPath": str(identity.cert),
                         "keyPath": str(identity.key)}]
    return browser.new_context(ignore_https_errors=True, client_certificates=certificates)


@pytest.fixture
def auditor_page(browser: Browser, server: str, certs: Pki) -> Iterator[Page]:
    context = context_for(browser, server, certs.auditor)
    yield context.new_page()
    context.close()


def banner(page: Page) -> tuple[str, str]:
    element = page.locator("#verify-banner")
    return element.get_attribute("data-status") or "", element.inner_text()


def cells(page: Page, selector: str) -> list[str]:
    return [c.strip() for c in page.locator(selector).all_inner_texts()]


def test_pages_load_verified_with_the_cli_numbers(auditor_page: Page, server: str,
                                                  log: Log, signer: AuditSigner) -> None:
    page = auditor_page
    for path, heading in [("", "Overview"), ("runs", "Training runs"), ("rounds", "Rounds"),
                          ("rounds/3", "Round 3"), ("model/latest", "Model lineage"),
                          ("privacy", "Privacy spend"), ("exports", "Exports")]:
        response = page.goto(server + path)
        assert response is not None and response.status == 200, path
        assert page.locator("h1").inner_text().startswith(heading), path
        status, said = banner(page)
        assert status == "ok" and "verified under pinned key" in said, (path, said)
        assert signer.key_id in said
        assert "signed in as alice (auditor)" in page.locator("header").inner_text()

    expected = cli_json("rounds", "--db", log.url)
    page.goto(server + "rounds")
    assert [int(x) for x in cells(page, "#rounds td.round")] == [r["round"] for r in expected]
    assert cells(page, "#rounds td.status") == [r["status"] for r in expected]
    shown = page.locator("#rounds td.epsilon")
    assert [float(v or "nan") for v in (shown.nth(i).get_attribute("data-value")
                                        for i in range(shown.count()))] == [
        r["epsilon"] for r in expected]
    assert cells(page, "#rounds td.epsilon") == [f"{r['epsilon']:.6g}" for r in expected]
    page.goto(server + "rounds?since=2&until=4&site=site-00")  # the filter form's query
    assert [int(x) for x in cells(page, "#rounds td.round")] == [
        r["round"] for r in cli_json("rounds", "--db", log.url, "--since", "2", "--until", "4",
                                     "--site", "site-00")] == [2, 4]


def test_round_lineage_runs_and_privacy_match_the_cli(auditor_page: Page, server: str,
                                                      log: Log) -> None:
    page = auditor_page
    detail = cli_json("show", "3", "--db", log.url)
    page.goto(server + "rounds/3")
    assert page.locator("#round-status").inner_text() == detail["status"] == "committed"
    attempts = page.locator("section.attempt")
    assert attempts.count() == 2
    assert "stage masked_input timed out" in attempts.nth(0).inner_text()
    charges = detail["attempts"][1]["charges"]
    rows = attempts.nth(1).locator("table.charges tr[data-site]")
    assert [rows.nth(i).get_attribute("data-site") for i in range(rows.count())] == sorted(charges)
    assert cells(page, "section.attempt table.charges td.epsilon") == [
        f"{charges[s]['epsilon']:.6g}" for s in sorted(charges)]

    latest = cli_json("rounds", "--db", log.url)[-1]["version"]
    chain = cli_json("model", latest, "--db", log.url)
    page.goto(server + "model/latest")
    titles = page.locator("#lineage td.version code")
    assert [titles.nth(i).get_attribute("title") for i in range(titles.count())] == [
        e["payload"]["version"] for e in chain] == log.built.versions[::-1]

    page.goto(server + "runs")
    runs = page.context.request.get(server + "api/runs").json()  # the source's runs, as data
    assert len(runs) == 2 and cells(page, "#runs td.status") == [r["status"] for r in runs]
    assert "stopped" in runs[1]["status"] and "operator request" in page.locator("#runs").inner_text()

    spent: dict[str, float] = {}  # each site's latest epsilon_total, from `show --json`
    for r in range(1, 7):
        for attempt in cli_json("show", str(r), "--db", log.url)["attempts"]:
            for site, charge in attempt["charges"].items():
                spent[site] = charge["epsilon_total"]
    page.goto(server + "privacy")
    sites = page.locator("#spend tr[data-site]")
    shown = {sites.nth(i).get_attribute("data-site"): sites.nth(i) for i in range(sites.count())}
    assert set(shown) == {f"site-{i:02d}" for i in range(6)}  # site-05: enrolled, never charged
    for site, total in spent.items():
        cell = shown[site].locator("td.spent")
        assert float(cell.get_attribute("data-value") or "nan") == total
        assert cell.inner_text().strip() == f"{total:.6g}"
    assert shown["site-00"].locator("td.budget").inner_text().strip() == "10"  # budget_changed
    assert shown["site-01"].locator("td.budget").inner_text().strip() == "8"
    assert page.locator("figure.site-chart svg polyline").count() == 2 * len(spent)
    assert page.locator("svg[aria-label='cumulative epsilon by site']").count() == 1


def test_json_endpoints_equal_the_cli(browser: Browser, server: str, certs: Pki, log: Log,
                                      signer: AuditSigner) -> None:
    context = context_for(browser, server, certs.auditor)
    try:
        def get(path: str) -> Any:
            response = context.request.get(server + path)
            assert response.status == 200, (path, response.text())
            assert response.headers["x-fedraft-verification"] == "ok"
            return response.json()

        assert get("api/rounds") == cli_json("rounds", "--db", log.url)
        odd = get("api/rounds?site=site-05")
        assert odd == cli_json("rounds", "--db", log.url, "--site", "site-05")
        assert [r["round"] for r in odd] == [1, 3, 5]
        assert get("api/rounds/3") == cli_json("show", "3", "--db", log.url)
        assert get("api/model/latest") == cli_json("model", "latest", "--db", log.url)
        assert get("api/model/latest")[0]["payload"]["version"] == log.built.versions[-1]
        verified = cli_json("verify", "--db", log.url, "--no-charges", "--key",
                            signer.public_key_hex)
        assert get("api/verify") == verified
        exported = context.request.get(server + "exports/entries.jsonl")
        lines = exported.text().splitlines()
        assert len(lines) == verified["counts"]["entries"] == verified["head_seq"] + 1
        assert json.loads(lines[-1])["entry_hash"] == verified["head_hash"]
        report = context.request.get(server + "exports/report.html")
        assert report.status == 200 and "log verifies" in report.text()
        missing = context.request.get(server + "api/rounds/99")
        assert missing.status == 404 and missing.json() == {"error": "round 99 is not in the log"}
    finally:
        context.close()


def test_no_write_path(browser: Browser, server: str, certs: Pki) -> None:
    context = context_for(browser, server, certs.auditor)
    try:
        for method in ("post", "put", "patch", "delete"):
            response = getattr(context.request, method)(server + "rounds", data="x")
            assert response.status == 405, method
            assert response.headers["allow"] == "GET, HEAD"
        assert context.request.post(server + "api/rounds/1").status == 405
    finally:
        context.close()


def test_only_auditor_certificates_get_in(browser: Browser, server: str, certs: Pki) -> None:
    context = context_for(browser, server, certs.operator)
    try:
        page = context.new_page()
        response = page.goto(server)
        assert response is not None and response.status == 403
        assert "bob has role operator" in page.locator("body").inner_text()
        assert page.locator("#verify-banner").count() == 0  # nothing about the log leaks
        assert context.request.get(server + "api/rounds").status == 403
    finally:
        context.close()
    for identity in (None, certs.foreign_auditor):  # refused in the TLS handshake
        context = context_for(browser, server, identity)
        try:
            with pytest.raises(Error, match=r"net::ERR_|ECONNRESET|socket|TLS|SSL"):
                context.new_page().goto(server, timeout=10_000)
        finally:
            context.close()


def test_tampered_log_shows_the_failure_banner(browser: Browser, certs: Pki, tmp_path: Path,
                                               signer: AuditSigner) -> None:
    log = make_log(tmp_path / "node.db", signer)
    for url in start_server(log, certs, "--recheck", "0"):  # no --key: not pinned
        context = context_for(browser, url, certs.auditor)
        try:
            page = context.new_page()
            page.goto(url + "rounds")
            status, said = banner(page)
            assert status == "unpinned" and "not pinned" in said
            target = log.built.seq_of_round[4]
            store = AuditStore(log.url, migrate=False)
            with store.engine.begin() as conn:
                conn.execute(text("DROP TRIGGER audit_entries_no_update"))
                conn.execute(text("UPDATE audit_entries SET payload = replace(payload, "
                                  "'\"survivors\":[\"site-00\"', '\"survivors\":[\"site-09\"') "
                                  "WHERE seq = :s"), {"s": target})
            store.close()
            for path in ("rounds", "", "privacy", "rounds/4", "model/latest", "runs"):
                response = page.goto(url + path)
                status, said = banner(page)
                assert status == "failed", (path, said)
                assert "log FAILS verification" in said and f"first bad entry seq {target}" in said
                if path:  # as the CLI: nothing of a failing log is shown, only its issues
                    assert response is not None and response.status == 409, path
                    assert "nothing of it is shown" in page.locator("main").inner_text()
                    assert page.locator("main table").count() == 0, path
            page.goto(url)
            assert str(target) in cells(page, "#issues td:first-child")
            assert page.locator("#withheld").count() == 1 and page.locator("#overview").count() == 0
            withheld = context.request.get(url + "api/rounds")
            assert withheld.status == 409 and "FAILS verification" in withheld.json()["error"]
            verdict = context.request.get(url + "api/verify")
            assert verdict.headers["x-fedraft-verification"] == "failed"
            assert verdict.json()["ok"] is False and verdict.json()["first_bad_seq"] == target
            evidence = context.request.get(url + "exports/entries.jsonl")  # kept for forensics
            assert evidence.status == 200 and "entries-failed.jsonl" in evidence.headers[
                "content-disposition"]
        finally:
            context.close()


class CountingSource:
    """Stands in for a store: a size, a head, and a count of verifications."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.verified = 0

    def __len__(self) -> int:
        return len(self.store)

    def head(self) -> Any:
        return self.store.head()

    def verify(self, **options: Any) -> Any:
        self.verified += 1
        return self.store.verify(**options)


def test_verdict_is_recomputed_when_the_log_grows_or_ages(tmp_path: Path,
                                                          signer: AuditSigner) -> None:
    log = make_log(tmp_path / "node.db", signer)
    now = [0.0]
    with AuditStore(log.url, signer=signer) as store:
        source = CountingSource(store)
        verifier = Verifier(source, {"genesis_key": signer.public_key_hex},  # type: ignore[arg-type]
                            pinned_key=signer.key_id, recheck=10, clock=lambda: now[0])
        first = verifier.current()
        assert first.status == "ok" and verifier.current() is first and source.verified == 1
        store.append("membership_changed", {"change": "add", "node": "node-5"},
                     store.head().raft_index + 1)  # type: ignore[union-attr]
        grown = verifier.current()
        assert source.verified == 2 and grown.report and grown.report.counts["entries"] == (
            first.report.counts["entries"] + 1)  # type: ignore[union-attr]
        now[0] = 10.5
        assert verifier.current() is not grown and source.verified == 3
        unpinned = Verifier(source, {}, pinned_key=None).current()  # type: ignore[arg-type]
        assert unpinned.status == "unpinned" and "not pinned" in unpinned.banner()["title"]


def test_runs_are_folded_from_training_entries(tmp_path: Path, signer: AuditSigner) -> None:
    log = make_log(tmp_path / "node.db", signer)
    with AuditStore(log.url, migrate=False) as store:
        runs = runs_from_entries(store.iter_entries())
    assert [(r["run"], r["status"], r["first_round"], r["target_round"]) for r in runs] == [
        (1, "finished", 1, 6), (2, "stopped", 7, 8)]
    assert runs[1]["stopped"]["by"] == "bob" and runs[1]["stopped"]["reason"] == "operator request"

    def entry(seq: int, kind: str, **payload: Any) -> Entry:
        return Entry(seq, kind, payload, seq, "0" * 64, "0" * 64, "k", "s")

    named = runs_from_entries([
        entry(0, "training_requested", run="run-a", task="mnist", first_round=1, rounds=2,
              target_round=2, actor="node:n1"),
        entry(1, "round_committed", round=1), entry(2, "round_committed", round=2),
        entry(3, "training_requested", run="run-b", first_round=3, rounds=5, target_round=7),
        entry(4, "training_stopped", run="run-b", target_round=7, reason="enough", node="n2"),
        entry(5, "training_stopped", run="run-a", target_round=2, reason="late"),
    ])
    assert [(r["run"], r["status"], r["task"], r["operator"]) for r in named] == [
        ("run-a", "finished", "mnist", "node:n1"), ("run-b", "stopped", None, None)]
    assert named[1]["stopped"] == {"seq": 4, "reason": "enough", "target_round": 7, "by": "n2"}


def test_serve_usage_errors_exit_2(tmp_path: Path, certs: Pki, log: Log) -> None:
    base = ["serve", "--db", log.url, "--ca", str(certs.ca)]
    missing = runner.invoke(audit_app, [*base, "--cert", str(tmp_path / "none.pem")])
    assert missing.exit_code == 2 and "unusable TLS files" in missing.stderr
    mismatched = runner.invoke(audit_app, [*base, "--cert", str(certs.auditor.cert),
                                           "--key-file", str(certs.operator.key)])
    assert mismatched.exit_code == 2 and "unusable TLS files" in mismatched.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = runner.invoke(audit_app, [*base, "--cert", str(certs.auditor.cert),
                                         "--port", str(taken.getsockname()[1])])
    assert busy.exit_code == 2 and "cannot listen on 127.0.0.1" in busy.stderr
    no_log = runner.invoke(audit_app, ["serve", "--ca", str(certs.ca), "--cert",
                                       str(certs.auditor.cert)], env={"FEDRAFT_AUDIT_DB": ""})
    assert no_log.exit_code == 2 and "no audit log given" in no_log.stderr
