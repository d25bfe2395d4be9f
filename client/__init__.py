"""fedraft's site agent: what a hospital runs to take part in a federation.

Layout: `cli` (the `fedraft-client` command line), `config` (site.toml), `agent` (the
connection to the nodes and the loop over round tasks), `round_work` (one round attempt:
train, privatize, persist, answer each stage), `store` (the site's durable files, all
written one way), `enroll` (importing an enrollment bundle), `training/` (the seam to
whatever trains the model: protocols, built-in tasks, a hosted Flower app) and `dp/`
(the privacy ledger, record-level DP-SGD, client-level DP and the shared sigma cache).
Of the coordinator, only `coordinator.wire` and `coordinator.lifeline` are imported.
"""
