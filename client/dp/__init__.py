"""Differential privacy on the site.

`ledger` is the site's privacy ledger on disk (plan, noise multiplier, history, write-ahead
charges) shared by both mechanisms; `record_level` is DP-SGD (Opacus) for built-in tasks;
`client_level` clips and noises the whole update of code the agent does not control (a
hosted Flower app); `sigma_cache` shares noise-multiplier searches between sites on one
machine. Nothing is imported here: `record_level` pulls in torch and opacus.
"""
