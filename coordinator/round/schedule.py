"""The local learning-rate schedule of a training run: public, computed by the leader.

Why on the leader: the site's DP-SGD noise multiplier is fixed by its budget, so a
decaying step size is the cheapest way to let late rounds settle instead of wandering
in the noise; keeping the schedule in the replicated round configuration makes the lr
of every round a function of public state, identical on every node and in the audit.
"""

from __future__ import annotations


def scheduled_lr(lr: float, lr_final: float, rnd: int, first: int, last: int) -> float:
    """The lr of round ``rnd`` in a run of rounds ``first..last``.

    Decays linearly from ``lr`` at ``first`` to ``lr * lr_final`` at ``last``; rounds
    outside the run (a run extended or stopped) are clamped to its ends.
    """
    if not 0.0 < lr_final <= 1.0:
        raise ValueError(f"lr_final must be in (0, 1], got {lr_final}")
    if last <= first:
        return lr if rnd <= first else lr * lr_final
    progress = min(1.0, max(0.0, (rnd - first) / (last - first)))
    return lr * (1.0 - (1.0 - lr_final) * progress)
