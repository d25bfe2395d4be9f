"""Finding the site behind an invalid secure sum, by testing halves of the suspects.

Under SecAgg+ the leader sees only the sum, so when the sum is invalid
(`aggregation.InvalidAggregate`) it knows that some survivor of that attempt sent a bad
input, not which. Like adaptive group testing with one defective: the next attempt
samples half of the suspects; a valid sum clears its survivors, an invalid one narrows
the suspects to them. With n suspects the site is named after at most ceil(log2 n)
further invalid attempts, and the valid ones commit rounds as usual. Sites that no
suspect-free test has cleared are not known to be honest, so fillers (to keep the round
at the sample size and SecAgg's threshold) come first from cleared sites.

Pure: the driver owns a `Search`, feeds it each attempt's outcome, and asks it whom to
sample. It lives in the leader's memory: a new leader starts again from the next invalid
sum, so the bound holds per leader.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Search:
    """One search: the sites one of which sent an invalid input, and those cleared since."""

    suspects: frozenset[str]
    cleared: frozenset[str] = frozenset()

    @classmethod
    def start(cls, survivors: Iterable[str]) -> Search:
        """After an invalid sum: every survivor of that attempt is a suspect."""
        return cls(frozenset(survivors))

    def after_valid(self, survivors: Iterable[str]) -> Search:
        """A valid sum: its survivors sent honest-looking inputs."""
        got = frozenset(survivors)
        return Search(self.suspects - got, self.cleared | got)

    def after_invalid(self, survivors: Iterable[str]) -> Search:
        """An invalid sum: the culprit survived it. A sum with no suspect in it means
        another site misbehaves too: start over from this sum's survivors."""
        got = frozenset(survivors)
        narrowed = self.suspects & got
        return Search(narrowed, self.cleared - got) if narrowed else Search(got)

    def culprit(self) -> str | None:
        """The site found, once one suspect is left."""
        return next(iter(self.suspects)) if len(self.suspects) == 1 else None

    def over(self) -> bool:
        """No suspect left (they all passed a valid sum): nothing to find."""
        return not self.suspects

    def sample(self, online: Iterable[str], want: int, min_clients: int,
               rng: random.Random) -> list[str] | None:
        """Whom the next attempt samples: half the online suspects (more when too few
        other sites are online to reach `min_clients`, but never all of them) and fillers
        up to `want`, cleared sites first. None when no test can split the suspects (a
        sum of fewer than `min_clients` inputs would expose them): the caller samples as
        usual."""
        pool = sorted(online)
        suspects = [s for s in pool if s in self.suspects]
        cleared = [s for s in pool if s in self.cleared]
        others = [s for s in pool if s not in self.suspects and s not in self.cleared]
        rng.shuffle(cleared)
        rng.shuffle(others)
        fillers = cleared + others
        tested = max(math.ceil(len(suspects) / 2), min_clients - len(fillers))
        if not suspects or (len(suspects) > 1 and tested >= len(suspects)):
            return None
        tested = min(tested, len(suspects))
        group = rng.sample(suspects, tested) + fillers[: max(0, max(want, min_clients) - tested)]
        return sorted(group) if len(group) >= min_clients else None


def attempts_bound(n: int) -> int:
    """Invalid attempts a search over `n` suspects costs at most, the first one included."""
    return 1 + math.ceil(math.log2(max(n, 1)))
