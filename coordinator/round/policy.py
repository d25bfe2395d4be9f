"""The round driver's decisions, as pure functions of what it knows.

The driver (`driver.py`) carries them out: it reads state, asks here what to do, and does
it (commands, waits, logs). Nothing here touches a clock, a thread or the network: times
are passed in, randomness is a generator the caller owns.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from coordinator import wire
from coordinator.core import queries
from coordinator.core.checks import REASON_CHARS
from coordinator.core.round_config import RoundConfig
from privacy.accounting import within_budget

TRAINING_STAGES = ("collect", "masked")
"""Stages that wait for local training, so they get the longer collect timeout."""


@dataclass(frozen=True)
class LeaderView:
    """What one driver step reads of the replicated state, in one consistent read. Nothing
    here grows with the enrolled sites: the step runs every 0.2 s, and sampling reads
    what it needs of the sites itself (`queries.budget_keys`)."""

    open_round: dict[str, Any] | None
    pending: bool
    last_round: int
    attempts: dict[int, int]
    config: RoundConfig
    run: tuple[int, int]
    head: str | None
    parent: str | None
    genesis: str | None
    attempt_base: int = 0  # attempts of the run's first round made before the run
    last_abort: str | None = None  # why the latest attempt of the next round was aborted

    @classmethod
    def of(cls, s: Mapping[str, Any]) -> LeaderView:
        versions = s["versions"]
        aborted = (s["history"].get(queries.last_round(s) + 1) or {}).get("aborted") or []
        return cls(
            open_round=s["round"], pending=queries.training_pending(s),
            last_round=queries.last_round(s), attempts=dict(s["attempts"]),
            config=RoundConfig.from_mapping(s["training"]["config"]),
            run=(s["training"].get("first_round", 1), s["training"]["target_round"]),
            head=queries.head(s),
            parent=versions[-1]["parent"] if versions else None,
            genesis=versions[0]["hash"] if versions else None,
            attempt_base=s["training"].get("attempt_base", 0),
            last_abort=aborted[-1]["reason"] if aborted else None,
        )


def stale_round_reason(open_round: Mapping[str, Any], term: int) -> str:
    """Why a leader aborts a round it finds open: rounds run synchronously in the driver
    thread, so an open round was opened by an earlier leader or an earlier, failed step."""
    return "leader_change" if open_round["term"] != term else "driver_restart"


def next_attempt(view: LeaderView) -> tuple[int, int]:
    """The round and attempt number the next `round_open` must name."""
    rnd = view.last_round + 1
    return rnd, view.attempts.get(rnd, 0) + 1


def give_up(view: LeaderView) -> str | None:
    """Why the run must stop now, or None: its next round has failed `max_attempts`
    attempts in a row (a round the cluster cannot satisfy is not retried forever)."""
    limit = view.config.max_attempts
    rnd, attempt = next_attempt(view)
    failed = attempt - 1 - (view.attempt_base if rnd == view.run[0] else 0)
    if not limit or failed < limit:
        return None
    return (f"round {rnd} failed {failed} attempts in a row (max_attempts {limit}); the "
            f"last: {view.last_abort or 'unknown'}")[:REASON_CHARS]


def cannot_sample(unsampled: tuple[int, int, str], rnd: int, limit: int) -> str | None:
    """Why the run must stop, or None: round `rnd` could not even be sampled `limit` times
    in a row (`unsampled` is (round, times, the last reason))."""
    seen, times, why = unsampled
    if not limit or seen != rnd or times < limit:
        return None
    return f"round {rnd} could not start {times} times in a row; the last: {why}"[:REASON_CHARS]


def sample_size(config: RoundConfig, eligible: int) -> int:
    """How many sites to sample from `eligible` affordable ones."""
    want = config.clients or math.ceil(config.fraction * eligible)
    return max(config.min_clients, min(want, eligible))


Sampling = Literal["sample", "wait", "give_up"]


def sampling(online: int, want: int, min_clients: int, late: bool) -> Sampling:
    """Sample once `want` sites are online, or `min_clients` once the online wait is over;
    give up (and retry later) when even that many are not there by then."""
    if online >= want or (late and online >= min_clients):
        return "sample"
    return "give_up" if late else "wait"


def choose(online: Iterable[str], want: int, rng: random.Random) -> list[str]:
    """The participants: up to `want` of the online sites, drawn by `rng`, sorted."""
    pool = sorted(online)
    return sorted(rng.sample(pool, min(want, len(pool))))


def stage_timeout(stage: str, config: RoundConfig) -> float:
    return config.collect_timeout_s if stage in TRAINING_STAGES else config.stage_timeout_s


def stage_done(answered: set[str], expected: frozenset[str], holding: bool, now: float,
               deadline: float) -> bool:
    """A stage ends when every expected site answered (unless a test holds it) or at its deadline."""
    return (answered >= expected and not holding) or now > deadline


def too_few(survivors: list[str], min_clients: int) -> str | None:
    """The abort reason when the sum holds too few updates to commit; None when enough."""
    if len(survivors) < min_clients:
        return f"too_few_updates ({len(survivors)}/{min_clients})"
    return None


def with_declines(reason: str, declined: Mapping[str, str], participants: int) -> str:
    """An abort reason that says first how many sampled sites declined and why (their
    own budget, say), since that, not the stage that then failed, is the real cause."""
    if not declined:
        return reason
    site, why = sorted(declined.items())[0]
    return f"{len(declined)} of {participants} sites declined ({site}: {why}); {reason}"[:REASON_CHARS]


def failed(what: str, exc: BaseException | str) -> str:
    """An abort reason naming a failure, cut to what the state machine records."""
    return f"{what}: {exc}"[:REASON_CHARS]


def payable(charges: Mapping[str, dict[str, float]],
            budgets: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The charges a commit may still record after an `overspend` refusal: a site that
    reported a mechanism its budget cannot pay is left out, the others are charged."""
    return {k: v for k, v in charges.items() if within_budget(v["epsilon_total"], budgets[k])}


def round_metrics(survivors: list[str], reported: Mapping[str, Mapping[str, float]],
                  seconds: float, upload_values: int) -> dict[str, float]:
    """Federated evaluation of the base and training loss, averaged over survivors.

    Example counts never travel in the clear (they are inside the masked vector), so
    site metrics are averaged without weights.
    """
    out: dict[str, float] = {"survivors": float(len(survivors)), "seconds": round(seconds, 3),
                             "upload_values": float(upload_values)}
    means = site_means([reported[site] for site in survivors if site in reported],
                       ("eval_accuracy", "eval_loss", "train_loss"))
    for name, key in (("eval_accuracy", "base_accuracy"), ("eval_loss", "base_loss"),
                      ("train_loss", "train_loss")):
        if name in means:
            out[key] = means[name]
    return out


def site_means(rows: Iterable[Mapping[str, float]], names: Iterable[str]) -> dict[str, float]:
    """Each metric's mean over the sites that reported it, unweighted: example counts stay
    inside the masked vector, never in the clear."""
    rows = list(rows)
    out = {}
    for name in names:
        values = [m[name] for m in rows if name in m]
        if values:
            out[name] = sum(values) / len(values)
    return out


SITE_METRICS = ("eval_accuracy", "eval_loss", "train_loss")
"""What the commit keeps of each survivor's report: its evaluation of the base model it
received, and its training loss (not its DP parameters: those are in its charge)."""


def site_metrics(survivors: list[str], reported: Mapping[str, Mapping[str, float]]
                 ) -> dict[str, dict[str, float]]:
    """Each survivor's own metrics, for the operator's and the auditor's per-site view."""
    return {site: {k: reported[site][k] for k in SITE_METRICS if k in reported[site]}
            for site in survivors if site in reported}


def submit_refusal(submit: wire.Submit, session: tuple[int, int, int],
                   participants: frozenset[str]) -> dict[str, Any] | None:
    """Whether a Submit belongs to the open session at all; the error reply if not."""
    if submit.session != session:
        return wire.error("stale_round", f"round {submit.round}.{submit.attempt} "
                          f"(term {submit.term}) is not open")
    if submit.site not in participants:
        return wire.error("not_participant", f"site {submit.site!r} was not sampled this round")
    return None
