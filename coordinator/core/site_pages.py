"""Pages of the enrolled-site list (pure): what the admin `Sites` call returns.

A federation may enroll tens of thousands of sites, each with a privacy charge per round
it took part in. One reply with every site and every charge grows without bound (gRPC
refuses replies over `wire.MAX_MESSAGE_BYTES`), and copying it all holds the lock Raft's
apply thread needs. So the list is read a page at a time, in site-id order from an
`after` cursor: the page is chosen under the lock and only its records are copied.
Charges are summarised (count, last one) unless they are asked for.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coordinator import wire

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_PAGE_CHARGES = 20_000
"""With `charges`, a page ends after the site that brings it to this many charges (about
4 MB): a page of full ledgers stays bounded however long the sites' histories are."""
MAX_SCAN = 20_000
"""Records one filtered page looks at before it ends (short, with a `next` cursor)."""
FIRST_ONLINE = 20
"""How many online site ids `Status` names besides their count."""

Sites = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class PageQuery:
    """One `Sites` request: a single site, or a page after `after` with filters."""

    site: str | None = None
    after: str | None = None
    limit: int = DEFAULT_LIMIT
    online: bool | None = None
    revoked: bool | None = None
    charges: bool = False

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> PageQuery:
        """The request's fields checked; raises `wire.WireError` (malformed) naming the bad one."""
        site = msg.get("site")
        after = msg.get("after")
        limit = msg.get("limit", DEFAULT_LIMIT)
        if site is not None:
            wire.site_id(site)
        if after is not None and not isinstance(after, str):
            raise wire.WireError("malformed", "after must be a site id")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise wire.WireError("malformed", f"limit must be an integer in 1..{MAX_LIMIT}")
        for name in ("online", "revoked"):
            if msg.get(name) is not None and not isinstance(msg.get(name), bool):
                raise wire.WireError("malformed", f"{name} must be true, false or absent")
        if not isinstance(msg.get("charges", False), bool):
            raise wire.WireError("malformed", "charges must be true or false")
        return cls(site=site, after=after, limit=limit, online=msg.get("online"),
                   revoked=msg.get("revoked"), charges=bool(msg.get("charges", False)))


class SiteOrder:
    """Enrolled site ids, sorted, kept up to date in time proportional to the sites
    enrolled since the last call (not a sort of every site per page).

    Sites are never removed (ids are never reused) and the site map keeps enrolment
    order, so the newest ids are its last entries. A different map (a snapshot was
    installed) is sorted afresh. Call it under the state's lock.
    """

    def __init__(self) -> None:
        self._sites: Sites | None = None
        self._ids: list[str] = []

    def ids(self, sites: Sites) -> list[str]:
        """The sorted ids of `sites` (this object's own list: do not change it)."""
        if sites is not self._sites or len(sites) < len(self._ids):
            self._sites, self._ids = sites, sorted(sites)
        new = len(sites) - len(self._ids)
        if new:
            for site in itertools.islice(reversed(sites.keys()), new):  # type: ignore[call-overload]
                bisect.insort(self._ids, site)
        return self._ids


def record(site: str, rec: Mapping[str, Any], online: bool, charges: bool) -> dict[str, Any]:
    """One site's row: a copy sharing nothing with the state. Its charges are summarised
    (`charge_count`, `last_charge`) and listed in full only with `charges`."""
    history = rec["charges"]
    row = {"site": site, "public_key": rec["public_key"], "revoked": rec["revoked"],
           "online": online, "budget": dict(rec["budget"]), "spent": rec["spent"],
           "quarantined": copy.deepcopy(rec.get("quarantined")),
           "charge_count": len(history), "last_charge": dict(history[-1]) if history else None}
    if charges:
        row["charges"] = [dict(c) for c in history]
    return row


def _matches(rec: Mapping[str, Any], site: str, q: PageQuery, online: frozenset[str]) -> bool:
    return ((q.revoked is None or rec["revoked"] == q.revoked)
            and (q.online is None or (site in online) == q.online))


def page(state: Mapping[str, Any], order: list[str], q: PageQuery,
         online: frozenset[str] | None, scan: int = MAX_SCAN) -> dict[str, Any]:
    """The reply's `sites`, `total` (sites matching the filters), `enrolled` and `next`
    (the cursor of the following page; None on the last). `order` is the sorted ids of
    the state's sites (`SiteOrder`); `online` is the leader's online set, None where it
    is not known (a follower), where an `online` filter is refused. The few revoked or
    online sites are walked by themselves; a page looks at `scan` records at most, so a
    filtered page may end short of `limit` with a `next` cursor."""
    sites: Sites = state["sites"]
    known = online if online is not None else frozenset()
    if q.online is not None and online is None:
        raise wire.WireError("not_leader", "only the leader knows which sites are online")
    if q.site is not None:
        rec = sites.get(q.site)
        rows = [] if rec is None or not _matches(rec, q.site, q, known) else [
            record(q.site, rec, q.site in known, True)]
        return {"sites": rows, "total": len(rows), "enrolled": len(sites), "next": None}
    revoked = revoked_ids(state)
    on = {s for s in known if s in sites}
    if q.revoked or q.online:  # few revoked or online among many enrolled: walk only them
        order = sorted(revoked if q.revoked and (not q.online or len(revoked) < len(on))
                       else on)
    start = 0 if q.after is None else bisect.bisect_right(order, q.after)
    rows: list[dict[str, Any]] = []
    charges = 0
    end = start
    for end in range(start, min(len(order), start + scan)):
        site = order[end]
        rec = sites[site]
        if not _matches(rec, site, q, known):
            continue
        rows.append(record(site, rec, site in known, q.charges))
        charges += len(rec["charges"]) if q.charges else 0
        if len(rows) == q.limit or charges >= MAX_PAGE_CHARGES:
            break
    more = end + 1 < len(order) and start < len(order)
    return {"sites": rows, "total": _total(sites, revoked, on, q), "enrolled": len(sites),
            "next": order[end] if more else None}


def revoked_ids(state: Mapping[str, Any]) -> Collection[str]:
    """The revoked sites: the state's index of them (`queries.revoked_index`), or, in a
    state restored from before the index, found by a scan until the next revocation."""
    index = state.get("revoked_index")
    if index is None:
        return {s for s, rec in state["sites"].items() if rec["revoked"]}
    return index


def _total(sites: Sites, revoked: Collection[str], online: set[str], q: PageQuery) -> int:
    """How many sites match the filters, counted over the few revoked and online ones."""
    if q.revoked:
        return sum(1 for s in revoked if q.online is None or (s in online) == q.online)
    if q.online:
        return sum(1 for s in online if q.revoked is None or (s in revoked) == q.revoked)
    excluded = (set(revoked) if q.revoked is False else set()) | (
        online if q.online is False else set())
    return len(sites) - len(excluded)


def first_online(online: Iterable[str], n: int = FIRST_ONLINE) -> list[str]:
    """The `n` smallest online site ids, sorted, without sorting them all."""
    return heapq.nsmallest(n, online)
