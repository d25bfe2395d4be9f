"""A site agent that sends a hostile input under SecAgg+; only `hostile_sites.py` runs it.

    python simulations/hostile_agent.py KIND <python> -m client run --config site.toml

It is the real `fedraft-client` with one change: the fixed-point words it masks are
replaced after encoding, so everything else (TLS, signatures, SecAgg+ stages, the DP
ledger) is what an honest site does. Kinds:

* negative_weight: the weight word encodes -1 (the real values stay)
* max_zero_weight: every value at +clip, the largest a site may send, with weight 0
* garbage:         uniformly random words, which decode to something in range
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("negative_weight", "max_zero_weight", "garbage")


def hostile_encoder(kind: str, honest):  # type: ignore[no-untyped-def]
    """`privacy.plan.encode_update`, but sending `kind`'s input instead."""

    def encode(update, plan, rng):  # type: ignore[no-untyped-def]
        words = honest(update, plan, rng)
        codec = plan.codec
        if kind == "negative_weight":
            words[-1] = np.uint32((1 << 32) - int(codec.weight_scale))
        elif kind == "max_zero_weight":
            words = codec.encode(np.full(plan.k, plan.clip), 0.0, rng)
        else:
            words = rng.integers(0, 1 << 32, words.size, dtype=np.uint64).astype(np.uint32)
        return words

    return encode


def main() -> None:
    kind, argv = sys.argv[1], sys.argv[2:]
    if kind not in KINDS or argv[1:3] != ["-m", "client"]:
        sys.exit(f"usage: hostile_agent.py {{{','.join(KINDS)}}} PYTHON -m client ARGS...")
    import privacy.plan as plan_module

    plan_module.encode_update = hostile_encoder(kind, plan_module.encode_update)
    sys.argv = ["fedraft-client", *argv[3:]]
    from client.cli import main as client_main

    client_main()


if __name__ == "__main__":
    main()
