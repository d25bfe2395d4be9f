"""Benchmark fedraft's SecAgg+ against Flower 1.41's SecAgg+ and a plain float32 sum.

    .venv/bin/python simulations/bench_secagg.py [--quick] [--skip-flower-above N] [--json]
        [--ns 10,20] [--ks 1000000] [--repeat 3] [--flower-repeat 1] [--unmask-workers W]

For each (n clients, K words, dropout) it runs, in one process:

* fedraft: the four SecAgg+ stages of privacy.secagg driven in memory; each client step
  is timed separately. fedraft_server_s is all server work of the session (verify
  adverts, route shares, add masked vectors as they arrive, reconstruct and unmask),
  with the unmasking spread over the calling thread and --unmask-workers helper
  processes (`coordinator.round.mask_pool`, started before timing, as a leader keeps them
  between rounds); fedraft_server_one_process_s is the same with every mask removed in
  the calling thread. fedraft_client_s is one client's masked-input step (decrypt
  shares, expand and add the self mask and every pairwise mask), averaged over clients.
* Flower: the real `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client) from
  flwr 1.41, exchanging real `Message`s through an in-process Grid that calls the mod
  directly instead of going through a SuperLink. Same n, vector length (K float32
  parameters), neighbour count (Flower's num_shares counts the client itself, so it is
  degree + 1) and threshold; dropped clients do not answer the masked-vector stage.
  flower_server_s is the workflow's wall time minus the time spent inside client calls.
* plain: summing the survivors' float32 vectors with numpy (no privacy).

Dropout d drops round(d * n) clients at the masked-input stage (after sharing keys).
fedraft and plain figures are the median of --repeat runs (default 3), Flower's of
--flower-repeat runs (default 1, it is slow); garbage is collected before every run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from coordinator.cluster.config import default_unmask_workers  # noqa: E402
from coordinator.round.mask_pool import MaskPool  # noqa: E402
from privacy.prg import apply_masks  # noqa: E402
from privacy.secagg import (  # noqa: E402
    MaskApplier,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    default_degree,
    default_threshold,
    make_context,
)

# --------------------------------------------------------------------------- fedraft


def bench_fedraft(
    n: int, k: int, dropped: set[int], masker: MaskApplier = apply_masks
) -> tuple[float, float, float]:
    """One fedraft session; returns (server s, mean client masking s, mean client total s)."""
    ids = [f"site-{i:03d}" for i in range(n)]
    degree = default_degree(n)
    params = SecAggParams(
        context=make_context("bench", 1, 0, 1),
        participants=tuple(ids),
        vector_len=k,
        threshold=default_threshold(degree),
        graph_seed=os.urandom(32),
        degree=degree,
    )
    identity = {cid: Ed25519PrivateKey.generate() for cid in ids}
    public = {cid: key.public_key() for cid, key in identity.items()}
    server = SecAggServer(params, public, masker)
    clients = {cid: SecAggClient(params, cid, identity[cid], public, os.urandom) for cid in ids}
    server_s = 0.0
    client_total = dict.fromkeys(ids, 0.0)
    client_mask: dict[str, float] = {}

    def on_server(fn, *args):  # type: ignore[no-untyped-def]
        nonlocal server_s
        t0 = time.perf_counter()
        out = fn(*args)
        server_s += time.perf_counter() - t0
        return out

    def on_client(cid, fn, *args):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn(*args)
        client_total[cid] += time.perf_counter() - t0
        return out

    base = np.random.default_rng(n * 7 + k).integers(0, 2**32, k, dtype=np.uint32)
    for cid in ids:
        on_server(server.receive_advertisement, on_client(cid, clients[cid].advertise))
    directories = on_server(server.close_advertise)
    for cid in ids:
        msg = on_client(cid, clients[cid].share_keys, directories[cid])
        on_server(server.receive_shares, msg)
    requests = on_server(server.close_share_keys)
    drop_ids = {ids[i] for i in dropped}
    for i, cid in enumerate(ids):
        if cid in drop_ids:
            continue
        x = base + np.uint32(i)
        t0 = time.perf_counter()
        msg = on_client(cid, clients[cid].masked_input, requests[cid], x)
        client_mask[cid] = time.perf_counter() - t0
        on_server(server.receive_masked_input, msg)
        del x, msg
    unmask = on_server(server.close_masked_input)
    for cid in server.unmask_recipients:
        on_server(server.receive_unmask, on_client(cid, clients[cid].unmask, unmask))
    result = on_server(server.finish)
    survivors = [i for i in range(n) if i not in dropped]
    expected = base * np.uint32(len(survivors)) + np.uint32(sum(survivors) % 2**32)
    if not np.array_equal(result.total, expected):
        raise AssertionError("fedraft unmasked sum differs from the plain sum")
    alive = [client_total[c] for c in ids if c not in drop_ids]
    return server_s, float(np.mean(list(client_mask.values()))), float(np.mean(alive))


# --------------------------------------------------------------------------- Flower


def bench_flower(n: int, k: int, dropped: set[int], degree: int, threshold: int) -> tuple[float, float]:
    """One Flower SecAgg+ round driven in-process; returns (server s, mean client masking s)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0

    class Proxy(ClientProxy):
        def __init__(self, node_id: int) -> None:
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def get_parameters(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def fit(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def evaluate(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def reconnect(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    node_ids = list(range(1, n + 1))
    vectors = {
        nid: np.random.default_rng(nid).uniform(-1, 1, k).astype(np.float32) for nid in node_ids
    }
    drop_nodes = {node_ids[i] for i in dropped}
    contexts = {
        nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        for nid in node_ids
    }
    client_s = {"total": 0.0, "transport": 0.0}
    mask_s: dict[int, float] = {}

    def fit(msg: Message, ctxt: Context) -> Message:
        res = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters([vectors[ctxt.node_id]]),
            num_examples=1,
            metrics={},
        )
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)

    class InProcessGrid(Grid):
        """Delivers each message straight to the destination's secaggplus_mod."""

        def __init__(self) -> None:
            self._next = 0

        def set_run(self, run):  # type: ignore[no-untyped-def]
            pass

        @property
        def run(self):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self):  # type: ignore[no-untyped-def]
            return list(node_ids)

        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            replies = []
            for msg in messages:
                self._next += 1
                msg.metadata.__dict__["_message_id"] = f"m{self._next}"
                nid = msg.metadata.dst_node_id
                # A real transport hands each node its own copy (the workflow shares one
                # content object between messages and the mod mutates it). Not timed.
                t0 = time.perf_counter()
                msg = copy.deepcopy(msg)
                client_s["transport"] += time.perf_counter() - t0
                stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if stage == Stage.COLLECT_MASKED_VECTORS and nid in drop_nodes:
                    continue  # this client drops before sending its masked vector
                t0 = time.perf_counter()
                reply = secaggplus_mod(msg, contexts[nid], fit)
                dt = time.perf_counter() - t0
                client_s["total"] += dt
                if stage == Stage.COLLECT_MASKED_VECTORS:
                    mask_s[nid] = dt
                replies.append(reply)
            return replies

    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(Proxy(nid))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
    )
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": 1})
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(k, dtype=np.float32)]), keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=degree + 1,
        reconstruction_threshold=threshold,
        clipping_range=1.0,
        max_weight=1.0,
    )
    grid = InProcessGrid()
    t0 = time.perf_counter()
    workflow(grid, context)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    out = compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    got = parameters_to_ndarrays(out)[0]
    survivors = [nid for nid in node_ids if nid not in drop_nodes]
    want = np.mean([vectors[nid] for nid in survivors], axis=0)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-3):
        raise AssertionError("Flower SecAgg+ did not return the survivors' average")
    return wall - client_s["total"] - client_s["transport"], float(np.mean(list(mask_s.values())))


# --------------------------------------------------------------------------- plain


def bench_plain(n: int, k: int, dropped: set[int]) -> float:
    """Summing the survivors' float32 vectors in place."""
    rng = np.random.default_rng(1)
    vecs = [rng.standard_normal(k, dtype=np.float32) for i in range(n) if i not in dropped]
    acc = np.zeros(k, dtype=np.float32)
    t0 = time.perf_counter()
    for v in vecs:
        np.add(acc, v, out=acc)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- main


def _median(repeat: int, fn, *args):  # type: ignore[no-untyped-def]
    """Run fn `repeat` times (after a garbage collection each) and take medians."""
    runs = []
    for _ in range(max(1, repeat)):
        gc.collect()
        runs.append(fn(*args))
    return tuple(float(np.median(col)) for col in zip(*runs, strict=True))


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"every value must be at least 2, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the grid of configurations and print a table (or JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n in {10, 20}, K = 100k only")
    ap.add_argument(
        "--skip-flower-above", type=int, default=None, metavar="N",
        help="do not run Flower for n > N (it is slow at large n and K)",
    )
    ap.add_argument("--json", action="store_true", help='last stdout line: {"rows": [...]}')
    ap.add_argument("--repeat", type=int, default=3, help="runs per fedraft/plain figure")
    ap.add_argument("--flower-repeat", type=int, default=1, help="runs per Flower figure")
    ap.add_argument("--ns", type=_int_list, default=None, metavar="N,N", help="client counts to run")
    ap.add_argument("--ks", type=_int_list, default=None, metavar="K,K", help="vector lengths to run")
    ap.add_argument(
        "--unmask-workers", type=int, default=default_unmask_workers(), metavar="W",
        help="helper processes for the server's unmasking, as a node uses "
        "([limits] unmask_workers; default: spare cores, at most 3)",
    )
    args = ap.parse_args(argv)
    if args.unmask_workers < 0:
        ap.error("--unmask-workers must be >= 0")
    with MaskPool(args.unmask_workers) as pool:
        pool.warm_up()  # a node's helpers stay up between rounds
        return _run_grid(args, pool)


def _run_grid(args: argparse.Namespace, pool: MaskPool) -> int:

    ns = args.ns or ([10, 20] if args.quick else [10, 20, 50, 100])
    ks = args.ks or ([100_000] if args.quick else [100_000, 1_000_000])
    rows = []
    bench_fedraft(5, 1000, set())  # warm up imports and lazy initialisation
    print(f"fedraft srv: unmasking on the calling thread and {pool.workers} helper process(es); "
          "1-proc: all in the calling thread")
    print(
        f"{'n':>4} {'K':>9} {'drop':>5} | {'fedraft srv':>11} {'1-proc':>7} {'fedraft cli':>11} | "
        f"{'flower srv':>10} {'flower cli':>10} | {'plain sum':>9} | {'speedup':>7} {'1-proc':>7}"
    )
    for k in ks:
        for n in ns:
            for dropout in (0.0, 0.1):
                # Which ones drop does not matter: the graph is a seeded permutation.
                dropped = set(range(round(dropout * n)))
                degree = default_degree(n)
                threshold = default_threshold(degree)
                f_srv, f_cli, f_tot = _median(args.repeat, bench_fedraft, n, k, dropped, pool)
                if pool.workers:
                    f_one, _, _ = _median(args.repeat, bench_fedraft, n, k, dropped)
                else:
                    f_one = f_srv
                fl_srv = fl_cli = None
                if args.skip_flower_above is None or n <= args.skip_flower_above:
                    fl_srv, fl_cli = _median(
                        args.flower_repeat, bench_flower, n, k, dropped, degree, threshold
                    )
                (plain,) = _median(args.repeat, lambda *a: (bench_plain(*a),), n, k, dropped)
                row = {
                    "n": n,
                    "k": k,
                    "dropout": dropout,
                    "degree": degree,
                    "threshold": threshold,
                    "fedraft_server_s": round(f_srv, 4),
                    "fedraft_server_one_process_s": round(f_one, 4),
                    "unmask_workers": pool.workers,
                    "fedraft_client_s": round(f_cli, 4),
                    "fedraft_client_all_stages_s": round(f_tot, 4),
                    "flower_server_s": None if fl_srv is None else round(fl_srv, 4),
                    "flower_client_s": None if fl_cli is None else round(fl_cli, 4),
                    "plain_sum_s": round(plain, 5),
                }
                rows.append(row)
                speed = "-" if fl_srv is None else f"{fl_srv / f_srv:6.1f}x"
                speed_one = "-" if fl_srv is None else f"{fl_srv / f_one:6.1f}x"
                fls = "-" if fl_srv is None else f"{fl_srv:10.3f}"
                flc = "-" if fl_cli is None else f"{fl_cli:10.3f}"
                print(
                    f"{n:>4} {k:>9} {dropout:>5.0%} | {f_srv:>11.3f} {f_one:>7.3f} {f_cli:>11.4f} | "
                    f"{fls:>10} {flc:>10} | {plain:>9.4f} | {speed:>7} {speed_one:>7}",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
