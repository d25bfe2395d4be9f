"""Pages of the site list, the status's online view and the leader's per-round site
reads: pure, over states built by the real state machine."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator import wire
from coordinator.core import commands, site_pages
from coordinator.core.queries import (
    Fresh,
    budget_keys,
    charge_histories,
    eligible_among,
    eligible_count,
    eligible_sites,
    identity_keys,
    site_identity,
)
from coordinator.core.site_pages import PageQuery, SiteOrder, page
from coordinator.core.state import apply, initial_state
from coordinator.round.charges import recheck
from privacy.accounting import CHARGE_FIELDS

IDS = st.from_regex(r"[a0Z][a0z_.-]{0,3}", fullmatch=True)


def _state(sites: list[str], revoked: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    s = initial_state()
    for i, site in enumerate(sites):
        assert apply(s, commands.enroll(site, f"{i:064x}"))["ok"]
    for site in revoked:
        assert apply(s, commands.revoke(site))["ok"]
    return s


def _follow(s: dict, q: PageQuery, online: frozenset[str] | None, scan: int) -> list[list[str]]:
    """Every page's ids from the first page to the one whose `next` is None."""
    pages, order, after = [], SiteOrder(), q.after
    while True:
        p = page(s, order.ids(s["sites"]), PageQuery(**{**q.__dict__, "after": after}),
                 online, scan)
        pages.append([r["site"] for r in p["sites"]])
        assert len(p["sites"]) <= q.limit and p["enrolled"] == len(s["sites"])
        after = p["next"]
        if after is None:
            return pages
        assert len(pages) <= len(s["sites"]) + 1, "paging does not advance"


@settings(max_examples=60, deadline=None)
@given(st.lists(IDS, unique=True, max_size=30), st.data(), st.integers(1, 7),
       st.integers(1, 9), st.sampled_from([None, True, False]), st.sampled_from([None, True, False]),
       st.booleans())
def test_following_pages_lists_each_matching_site_once_in_id_order(
        sites: list[str], data: st.DataObject, limit: int, scan: int,
        want_online: bool | None, want_revoked: bool | None, restored: bool) -> None:
    revoked = set(data.draw(st.lists(st.sampled_from(sites), unique=True))) if sites else set()
    online = frozenset(data.draw(st.lists(st.sampled_from(sites), unique=True)) + ["gone"]) \
        if sites else frozenset()  # an online site unknown here (just restored) is not listed
    s = _state(sites, revoked)
    if restored:  # a state from before the revoked index
        del s["revoked_index"]
    q = PageQuery(limit=limit, online=want_online, revoked=want_revoked)
    expected = sorted(x for x in sites if (want_revoked is None or (x in revoked) == want_revoked)
                      and (want_online is None or (x in online) == want_online))
    pages = _follow(s, q, online, scan)
    assert [x for p in pages for x in p] == expected
    first = page(s, sorted(s["sites"]), q, online, scan)
    assert first["total"] == len(expected)
    if want_online is None and want_revoked is None and scan >= limit:
        assert all(len(p) == limit for p in pages[:-1])  # unfiltered: full until the last


@given(st.lists(IDS, unique=True, min_size=1, max_size=20), st.data())
def test_a_page_after_any_cursor_starts_at_the_next_id(sites: list[str], data: st.DataObject) -> None:
    s = _state(sites)
    after = data.draw(IDS)
    p = page(s, sorted(sites), PageQuery(after=after, limit=1000), None)
    assert [r["site"] for r in p["sites"]] == sorted(x for x in sites if x > after)
    assert p["next"] is None


def test_revocations_keep_an_index_that_a_restored_state_rebuilds() -> None:
    s = _state(["a", "b", "c"], {"b"})
    assert s["revoked_index"] == {"b": True}
    del s["revoked_index"]
    assert apply(s, commands.revoke("c"))["ok"]
    assert s["revoked_index"] == {"b": True, "c": True}


def test_site_order_follows_enrolments_and_a_new_map() -> None:
    s = _state(["m", "c", "x"])
    order = SiteOrder()
    assert order.ids(s["sites"]) == ["c", "m", "x"]
    for i, site in enumerate(["a", "zz", "n"]):
        assert apply(s, commands.enroll(site, f"{100 + i:064x}"))["ok"]
    assert order.ids(s["sites"]) == ["a", "c", "m", "n", "x", "zz"]
    restored = copy.deepcopy(s)  # a snapshot installed: another map, sorted afresh
    del restored["sites"]["a"]
    assert order.ids(restored["sites"]) == ["c", "m", "n", "x", "zz"]


def test_a_page_shares_nothing_with_the_state_and_summarises_charges() -> None:
    s = _state(["a", "b"])
    s["sites"]["a"]["charges"] = [{"round": r, "attempt": 1, "epsilon": 0.1,
                                   "epsilon_total": 0.1 * r} for r in (1, 2, 3)]
    before = copy.deepcopy(s)
    p = page(s, ["a", "b"], PageQuery(), frozenset({"b"}))
    a, b = p["sites"]
    assert "charges" not in a and a["charge_count"] == 3 and a["last_charge"]["round"] == 3
    assert b["charge_count"] == 0 and b["last_charge"] is None and b["online"] and not a["online"]
    full = page(s, ["a", "b"], PageQuery(charges=True), None)["sites"][0]
    full["charges"][0]["epsilon"] = 9.0
    full["budget"]["epsilon"] = 9.0
    a["last_charge"]["epsilon"] = 9.0
    assert s == before


def test_one_site_comes_with_every_charge() -> None:
    s = _state(["a", "b"])
    s["sites"]["b"]["charges"] = [{"round": 1, "attempt": 1, "epsilon": 0.5}]
    one = page(s, ["a", "b"], PageQuery(site="b"), None)
    assert [r["site"] for r in one["sites"]] == ["b"] and one["sites"][0]["charges"] == [
        {"round": 1, "attempt": 1, "epsilon": 0.5}]
    assert one["next"] is None and one["total"] == 1
    assert page(s, ["a", "b"], PageQuery(site="q"), None)["sites"] == []


def test_a_page_of_full_ledgers_ends_at_its_charge_bound() -> None:
    n = site_pages.MAX_PAGE_CHARGES // 2 + 1  # two such sites pass the bound
    s = _state(["a", "b", "c"])
    for site in ("a", "b", "c"):
        s["sites"][site]["charges"] = [{"round": 1, "attempt": 1}] * n
    p = page(s, ["a", "b", "c"], PageQuery(charges=True), None)
    assert [r["site"] for r in p["sites"]] == ["a", "b"] and p["next"] == "b"


def test_the_online_filter_needs_the_leader() -> None:
    s = _state(["a"])
    with pytest.raises(wire.WireError) as exc:
        page(s, ["a"], PageQuery(online=True), None)
    assert exc.value.code == "not_leader"


@pytest.mark.parametrize("msg", [
    {"limit": 0}, {"limit": site_pages.MAX_LIMIT + 1}, {"limit": True}, {"limit": "5"},
    {"limit": 2.0}, {"after": 3}, {"online": "yes"}, {"revoked": 1}, {"charges": "all"},
    {"site": "bad id!"}])
def test_bad_page_requests_are_malformed(msg: dict) -> None:
    with pytest.raises(wire.WireError) as exc:
        PageQuery.from_wire(msg)
    assert exc.value.code == "malformed"


def test_page_request_defaults() -> None:
    assert PageQuery.from_wire({}) == PageQuery(limit=site_pages.DEFAULT_LIMIT)
    assert PageQuery.from_wire({"after": "a", "limit": 5, "online": True}) == PageQuery(
        after="a", limit=5, online=True)


def test_status_names_the_first_online_sites_only() -> None:
    online = {f"s{i:05d}" for i in range(5000)}
    assert site_pages.first_online(online) == [f"s{i:05d}" for i in range(site_pages.FIRST_ONLINE)]
    assert site_pages.first_online(set()) == []


@given(st.lists(IDS, unique=True, max_size=20), st.data())
def test_the_leaders_site_reads_agree_with_eligible_sites(sites: list[str],
                                                          data: st.DataObject) -> None:
    revoked = set(data.draw(st.lists(st.sampled_from(sites), unique=True))) if sites else set()
    s = _state(sites, revoked)
    asked = set(data.draw(st.lists(IDS, max_size=10)))
    eligible = eligible_sites(s)
    assert eligible_count(s) == len(eligible)
    assert eligible_among(s, asked) == asked & set(eligible)
    assert budget_keys(s).value == (len(eligible), {})  # none charged: none to check
    assert identity_keys(s, eligible) == {x: s["sites"][x]["public_key"] for x in eligible}
    for x in sites:
        assert site_identity(s, x) == (s["sites"][x]["public_key"], x in revoked)
    assert site_identity(s, "not-enrolled-site") is None


def test_a_fresh_result_is_not_copied_again() -> None:
    value = {"a": [1, 2]}
    assert copy.deepcopy(Fresh(value)).value is value


def test_budgets_are_checked_again_only_where_their_key_changed() -> None:
    s = _state(["a", "b", "c", "d"], {"d"})
    charge = {"round": 1, "attempt": 1, "noise_multiplier": 1.0, "sample_rate": 0.1,
              "steps": 5.0, "clip_norm": 1.0, "epsilon": 0.3}
    for site in ("a", "b", "d"):
        s["sites"][site]["charges"] = [dict(charge)]
    count, keys = budget_keys(s).value
    assert count == 3 and keys == {"a": (1, 8.0, 1e-5), "b": (1, 8.0, 1e-5)}  # d is revoked
    assert recheck(keys, {}) == ["a", "b"]  # c was never charged: it can pay
    known = {x: (keys[x], True) for x in ("a", "b")}
    assert recheck(keys, known) == []
    assert apply(s, commands.set_budget("b", 9.0))["ok"]
    s["sites"]["a"]["charges"].append(dict(charge, round=2))
    assert recheck(budget_keys(s).value[1], known) == ["a", "b"]
    histories = charge_histories(s, ["a"]).value
    assert histories == {"a": [{k: charge[k] for k in CHARGE_FIELDS}] * 2}
    histories["a"][0]["steps"] = 0.0
    assert s["sites"]["a"]["charges"][0]["steps"] == 5.0
