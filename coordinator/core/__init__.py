"""The pure replicated core: the state machine every node applies in log order.

No clock, threads, randomness or I/O. `state` applies commands (`apply`), `commands`
builds them (op names are spelled once, there), `round_config` types and validates the
round configuration, `queries` reads state. Everything else in the coordinator is shell
around it.
"""
