"""The leader's round: only the current leader runs this.

`driver` carries out the loop over injected services; `policy` is its pure decisions
(sample, next attempt, stage done, abort reasons, survivors' metrics); `aggregation`
composes Sum (plain | SecAgg+) -> WeightedMean -> ServerOptimizer; `charges` computes
privacy charges off the GIL (the math is `privacy.accounting`); `mask_pool` unmasks on
several cores; `schedule` the run's learning rate; `faults` the test-only hold hook.
"""
