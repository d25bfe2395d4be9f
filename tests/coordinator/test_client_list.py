"""`fedraft client list` pages through the enrolled sites of a real cluster, and
`cluster status` counts online sites rather than listing them all."""

from __future__ import annotations

import json
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import wire
from coordinator.ops.admin_client import Refused
from tests.coordinator.conftest import fedraft_cli

SITES = [f"site-{i:02d}" for i in range(23)]


def _list(c, *args: str) -> dict:  # type: ignore[no-untyped-def]
    r = fedraft_cli(c, "client", "list", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_client_list_pages_filters_and_follows_every_page(make_cluster) -> None:
    c = make_cluster(genesis=False)
    for site in reversed(SITES):  # enrolment order is not listing order
        c.admin.call("Enroll", {"site": site,
                                "public_key": wire.public_key_hex(Ed25519PrivateKey.generate())})
    c.admin.call("Revoke", {"site": "site-07"})

    first = _list(c, "--limit", "10")
    assert [s["site"] for s in first["sites"]] == SITES[:10]
    assert first["next"] == "site-09" and first["total"] == first["enrolled"] == 23
    assert {"charge_count", "last_charge", "spent", "budget"} <= set(first["sites"][0])
    assert "charges" not in first["sites"][0]
    second = _list(c, "--limit", "10", "--after", first["next"])
    assert [s["site"] for s in second["sites"]] == SITES[10:20]
    last = _list(c, "--limit", "10", "--after", second["next"])
    assert [s["site"] for s in last["sites"]] == SITES[20:] and last["next"] is None

    every = _list(c, "--all", "--limit", "4")
    assert [s["site"] for s in every["sites"]] == SITES and every["next"] is None
    assert [s["site"] for s in _list(c, "--revoked")["sites"]] == ["site-07"]
    assert _list(c, "--online") == {"sites": [], "total": 0, "enrolled": 23, "next": None}

    table = fedraft_cli(c, "client", "list", "--limit", "5")
    assert table.returncode == 0 and "5 of 23 sites; next page: --after site-04" in table.stdout

    for bad in (["--limit", "0"], ["--limit", "1001"], ["--after", "not a site!"]):
        r = fedraft_cli(c, "client", "list", *bad)
        assert r.returncode == 2 and bad[0] in r.stderr, (bad, r.stderr)

    status = fedraft_cli(c, "cluster", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["clients_online"] == 0 and report["clients_online_first"] == []
    assert report["sites_enrolled"] == 23


def test_a_follower_pages_sites_but_cannot_filter_by_online(make_cluster) -> None:
    c = make_cluster(genesis=False)
    c.admin.call("Enroll", {"site": "only-site",
                            "public_key": wire.public_key_hex(Ed25519PrivateKey.generate())})
    leader = c.wait_leader(30)
    follower = next(n for n in c.nodes if n.id != leader)
    page = None
    for _ in range(100):  # reads are local: wait until the follower applied the enrolment
        page = c.admin.sites(endpoint=follower.admin)
        if page["total"]:
            break
        time.sleep(0.1)
    assert page is not None and page["leader"] is False
    assert [s["site"] for s in page["sites"]] == ["only-site"]
    assert page["sites"][0]["online"] is False
    try:
        c.admin.sites(endpoint=follower.admin, online=True)
    except Refused as exc:
        assert exc.code == "not_leader"
    else:
        raise AssertionError("a follower filtered by online")
    status = c.admin.call("Status", endpoint=follower.admin)
    assert status["clients_online"] is None and status["clients_online_first"] is None
    one = c.admin.site("only-site")
    assert one is not None and one["charges"] == [] and c.admin.site("no-such-site") is None
