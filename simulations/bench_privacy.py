"""Accuracy of fedraft's full privacy pipeline at several epsilons, in one process tree.

    .venv/bin/python simulations/bench_privacy.py [--quick] [--rounds R] [--plot PATH] [--json]

Every round of every run goes through what a real round does, minus the network:

1. each site trains from the global model: record-level DP-SGD with its own Opacus
   ``PrivacyEngine`` (``client.dp.record_level.DPTorchTrainer``, Poisson sampling, PRV accountant,
   budget epsilon at delta 1e-5 over the planned rounds), or plain SGD for the
   non-private row (``client.training.tasks.TorchTaskTrainer``);
2. update = trained - base, plus the site's error-feedback residual, projected onto the
   round's public index set (10% of the coordinates: the top half of the last global
   change and seeded random ones, ``privacy.sparsify``), clipped per coordinate (the
   cut-off part stays in the residual), weighted by the site's record count and
   fixed-point encoded in Z_2^32 with stochastic rounding (``privacy.encoding``);
3. SecAgg+ (``privacy.secagg``) with all sites, real X25519/AES keys and Shamir shares,
   driven in memory; the server only ever holds the masked vectors and the exact sum;
4. the server decodes the sum, divides by the summed weight, scatters it to a dense
   vector and applies it to the global model (FedAvg with server learning rate).

Accuracy is that of the final global model on the task's global held-out test split
(``client.training.tasks.evaluate_global``), mean and standard deviation over seeds. The
privacy budget is checked by each site (a site would refuse a round past its budget;
the plan makes the last round land within it), and every run's largest site epsilon is
reported.

Runs are independent and spread over ``--workers`` processes (default: CPU count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DELTA = 1e-5
EPSILONS: tuple[float | None, ...] = (1.0, 3.0, 8.0, None)
SPLITS = ("iid", "dirichlet")
ALPHA = 0.5
SPARSITY = 10  # one coordinate in SPARSITY is sent


@dataclass(frozen=True)
class Setting:
    """Hyperparameters of one dataset's runs (chosen on seeds 0-2, see the report)."""

    dataset: str
    num_sites: int
    rounds: int
    local_epochs: int
    steps_per_epoch: int  # DP: Poisson sample rate 1/steps_per_epoch at every site
    dp_lr: float
    clip_norm: float
    value_clip: float  # per-coordinate clip before encoding
    lr_final: float = 1.0  # local lr decays linearly to lr_final * lr by the last round
    server_lr: float = 1.0
    server_momentum: float = 0.0
    ema: float = 0.0  # the released model is an EMA of the global models (0: off)
    plain_lr: float = 0.05  # non-private row: the task defaults otherwise
    momentum: float = 0.0  # local SGD momentum under DP
    sparsity: int = SPARSITY  # one coordinate in `sparsity` is sent
    data_seed: int = -1  # >= 0: fixed split and initial model; seeds then vary DP noise only
    task: str = ""  # client.training.tasks task (model) trained on `dataset`; "" means the task `dataset`

    @property
    def model_task(self) -> str:
        return self.task or self.dataset


SETTINGS: dict[str, Setting] = {
    # Only knobs the real round driver has: no EMA of released models, no server momentum.
    # Many small full-batch steps with a linear lr decay to almost nothing: at a fixed
    # epsilon the total noise-to-signal is about the same however the steps are split,
    # so more rounds buy optimisation, and the low final lr averages out the last noise.
    "breast_cancer": Setting(
        dataset="breast_cancer",
        num_sites=5,
        rounds=100,
        local_epochs=1,
        steps_per_epoch=1,
        dp_lr=1.0,
        lr_final=0.05,
        clip_norm=1.0,
        value_clip=1.0,
    ),
    # digits_small: fixed Sobel edges split into +/- halves (eight directed edge maps) +
    # raw pixels, layer-normed, into one trained Linear (5,770 parameters;
    # client/tasks.DigitsFeatures). Each site adds noise for its own ~115 records, sqrt(10)
    # times the noise of one central DP-SGD over all of them. Clip 0.1 (all per-record
    # gradients clipped: normalised-gradient descent). iid, eps 3, accuracy over seeds:
    #   lr 5:  0.889 +- 0.005 (seeds 0-2), 0.867 +- 0.019 (seeds 3-5)
    #   lr 4:  0.872 +- 0.022 (seeds 3-5); lr 3: 0.882 (0-2); lr 7: 0.877; lr 10: 0.851
    #   dense upload (no sparsification): 0.892 (0-2); 300 rounds 0.873; 120 rounds 0.869
    #   (0-5); clip 0.5 lr 1: 0.880; clip 1 lr 0.5: 0.876; zero-initialised: 0.876 (0-5)
    # Other features at their best lr: |edges| (3,210 parameters) 0.879 (0-2); edges
    # pooled 2x2 0.863; + Laplacian 0.862; the plain linear model (650 parameters) 0.830.
    # Noise, not sparsification or the model, sets the limit: the same epsilon buys the
    # same noise per epoch at any sample rate (PRV: sigma 19.8 at q=1 x 200 steps, 14.0 at
    # q=0.5 x 400), and the seed (split and noise draw) moves the mean by 2 points.
    "digits": Setting(
        dataset="digits",
        task="digits_small",
        num_sites=10,
        rounds=200,
        local_epochs=1,
        steps_per_epoch=1,
        dp_lr=5.0,
        lr_final=0.01,
        clip_norm=0.1,
        value_clip=1.0,
    ),
}


@dataclass(frozen=True)
class Run:
    setting: Setting
    split: str
    epsilon: float | None
    seed: int


def _flatten(params: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in names])


def _unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, ref in like.items():
        size = int(ref.size)
        out[name] = vec[offset : offset + size].reshape(ref.shape).astype(np.float32)
        offset += size
    return out


def secure_sum(
    round_number: int, graph_seed: bytes, inputs: Mapping[str, np.ndarray], identity: Mapping[str, Any]
) -> np.ndarray:
    """One SecAgg+ session over all sites, every stage in memory; returns the exact sum."""
    from privacy.secagg import (
        SecAggClient,
        SecAggParams,
        SecAggServer,
        default_degree,
        default_threshold,
        make_context,
    )

    ids = tuple(sorted(inputs))
    degree = default_degree(len(ids))
    params = SecAggParams(
        context=make_context("bench-privacy", round_number, 0, 1),
        participants=ids,
        vector_len=int(next(iter(inputs.values())).shape[0]),
        threshold=default_threshold(degree),
        graph_seed=graph_seed,
        degree=degree,
    )
    public = {cid: identity[cid].public_key() for cid in ids}
    server = SecAggServer(params, public)
    clients = {cid: SecAggClient(params, cid, identity[cid], public, os.urandom) for cid in ids}
    for cid in ids:
        server.receive_advertisement(clients[cid].advertise())
    for cid, directory in server.close_advertise().items():
        server.receive_shares(clients[cid].share_keys(directory))
    for cid, request in server.close_share_keys().items():
        server.receive_masked_input(clients[cid].masked_input(request, inputs[cid]))
    unmask = server.close_masked_input()
    for cid in server.unmask_recipients:
        server.receive_unmask(clients[cid].unmask(unmask))
    result = server.finish()
    if set(result.survivors) != set(ids):
        raise RuntimeError(f"lost sites in a session without dropouts: {result.dropped}")
    return result.total


def run_one(run: Run, rounds_override: int | None = None) -> dict[str, Any]:
    """One federated training run; returns accuracy, largest site epsilon and timing."""
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.dp.record_level import DPTorchTrainer
    from client.training.tasks import evaluate_global, make_trainer
    from privacy.encoding import FixedPointCodec
    from privacy.sparsify import (
        apply_error_feedback,
        clip_values,
        new_residual,
        project,
        public_index_set,
        scatter,
    )

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    started = time.perf_counter()
    s = run.setting
    rounds = rounds_override or s.rounds
    ids = [f"site-{i:02d}" for i in range(s.num_sites)]
    tasks = [
        make_trainer(
            s.model_task,
            site_index=i,
            num_sites=s.num_sites,
            method=run.split,
            alpha=ALPHA,
            seed=run.seed if s.data_seed < 0 else s.data_seed,
            device="cpu",
        )
        for i in range(s.num_sites)
    ]
    counts = [t.site.num_train for t in tasks]
    state_dir = tempfile.TemporaryDirectory(prefix="bench-privacy-")
    if run.epsilon is None:
        trainers: list[Any] = tasks
        config: dict[str, Any] = {"lr": s.plain_lr}
    else:
        trainers = [
            DPTorchTrainer(
                t,
                run.epsilon,
                DELTA,
                rounds,
                Path(state_dir.name) / f"{cid}.json",
                clip_norm=s.clip_norm,
                sample_rate=1.0 / s.steps_per_epoch,
                local_epochs=s.local_epochs,
                seed=run.seed * 1000 + i,
            )
            for i, (t, cid) in enumerate(zip(tasks, ids, strict=True))
        ]
        config = {"lr": s.dp_lr, "local_epochs": s.local_epochs, "momentum": s.momentum}
    identity = {cid: Ed25519PrivateKey.generate() for cid in ids}

    params = tasks[0].initial_parameters()
    names = list(params)
    global_vec = _flatten(params, names)
    dim = global_vec.shape[0]
    k = dim // s.sparsity
    weight_cap = float(sum(counts))  # public bound: no site holds more than all records
    codec = FixedPointCodec(clip=s.value_clip, n_clients=s.num_sites, max_weight=1.0)
    residual: list[np.ndarray | None] = [None] * s.num_sites
    last_change: np.ndarray | None = None
    velocity = np.zeros(dim)
    ema_vec = global_vec.copy()
    enc_rng = np.random.default_rng([run.seed, 0xE1C])
    for r in range(rounds):
        round_seed = hashlib.sha256(f"bench-privacy/{run.seed}/{r}".encode()).digest()
        idx = public_index_set(dim, k, last_change, round_seed)
        inputs: dict[str, np.ndarray] = {}
        for i, (cid, trainer) in enumerate(zip(ids, trainers, strict=True)):
            lr = config["lr"] * (1.0 - (1.0 - s.lr_final) * r / max(1, rounds - 1))
            fit = trainer.fit(params, {**config, "lr": lr, "round": r})
            corrected = apply_error_feedback(_flatten(fit.params, names) - global_vec, residual[i])
            clipped, _ = clip_values(project(corrected, idx), s.value_clip)
            residual[i] = new_residual(corrected, idx, clipped)
            weight = counts[i] / weight_cap
            inputs[cid] = codec.encode(clipped * weight, weight, enc_rng)
        total = secure_sum(r + 1, round_seed, inputs, identity)
        value_sum, weight_sum = codec.decode(total)
        velocity = s.server_momentum * velocity + scatter(value_sum / weight_sum, idx, dim)
        change = s.server_lr * velocity
        global_vec = global_vec + change
        params = _unflatten(global_vec, params)
        last_change = change
        ema_vec = s.ema * ema_vec + (1.0 - s.ema) * global_vec
    released = _unflatten(ema_vec, params) if s.ema > 0 else params
    accuracy = evaluate_global(s.model_task, released)
    eps_spent = max((t.epsilon_spent for t in trainers), default=0.0) if run.epsilon is not None else None
    state_dir.cleanup()
    return {
        "dataset": s.dataset,
        "split": run.split,
        "epsilon": run.epsilon,
        "seed": run.seed,
        "accuracy": accuracy,
        "epsilon_spent_max": eps_spent,
        "noise_multiplier": trainers[0].noise_multiplier if run.epsilon is not None else None,
        "seconds": time.perf_counter() - started,
    }


def _progress(done: int, total: int, res: dict[str, Any]) -> None:
    print(
        f"[{done}/{total}] {res['dataset']} {res['split']} eps={res['epsilon']} seed={res['seed']}: "
        f"accuracy {res['accuracy']:.3f} ({res['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def run_all(runs: Sequence[Run], workers: int, attempts: int = 3) -> list[dict[str, Any]]:
    """Every run, over ``workers`` processes. A worker killed from outside (the OOM killer
    on a shared machine) breaks the whole pool; the runs it had not finished are
    resubmitted to a fresh pool, up to ``attempts`` times."""
    if workers <= 1:
        results = []
        for run in runs:
            results.append(run_one(run))
            _progress(len(results), len(runs), results[-1])
        return results
    done: dict[int, dict[str, Any]] = {}
    for _ in range(attempts):
        pending = [i for i in range(len(runs)) if i not in done]
        if not pending:
            break
        try:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(run_one, runs[i]): i for i in pending}
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    _progress(len(done), len(runs), done[futures[future]])
        except BrokenProcessPool as exc:
            print(f"worker lost ({exc}); resubmitting {len(runs) - len(done)} runs", file=sys.stderr)
    if len(done) < len(runs):
        raise RuntimeError(f"{len(runs) - len(done)} runs failed {attempts} times")
    return [done[i] for i in range(len(runs))]


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, split, epsilon): accuracy mean and std over seeds."""
    groups: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    for res in results:
        groups.setdefault((res["dataset"], res["split"], res["epsilon"]), []).append(res)
    rows = []
    for (dataset, split, eps), group in groups.items():
        acc = np.array([g["accuracy"] for g in group])
        spent = [g["epsilon_spent_max"] for g in group if g["epsilon_spent_max"] is not None]
        rows.append(
            {
                "dataset": dataset,
                "split": split,
                "epsilon": eps,
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                "seeds": len(group),
                "epsilon_spent_max": max(spent) if spent else None,
                "noise_multiplier": group[0]["noise_multiplier"],
            }
        )
    order = {e: i for i, e in enumerate(EPSILONS)}
    rows.sort(key=lambda r: (r["dataset"], SPLITS.index(r["split"]), order.get(r["epsilon"], 99)))
    return rows


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'dataset':<14} {'split':<10} {'epsilon':>8} {'sigma':>7} {'spent':>7} {'accuracy':>17}")
    for r in rows:
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:g}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}"
        acc = f"{r['accuracy_mean']:.3f} +- {r['accuracy_std']:.3f}"
        print(f"{r['dataset']:<14} {r['split']:<10} {eps:>8} {sigma:>7} {spent:>7} {acc:>17}")


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against epsilon, one panel per dataset, one line per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for split, colour in zip(SPLITS, ("tab:blue", "tab:orange"), strict=True):
            mine = [r for r in rows if r["dataset"] == dataset and r["split"] == split]
            dp = sorted((r for r in mine if r["epsilon"] is not None), key=lambda r: r["epsilon"])
            if dp:
                ax.errorbar(
                    [r["epsilon"] for r in dp],
                    [r["accuracy_mean"] for r in dp],
                    yerr=[r["accuracy_std"] for r in dp],
                    marker="o",
                    color=colour,
                    capsize=3,
                    label=f"{split} DP-SGD",
                )
            for r in mine:
                if r["epsilon"] is None:
                    ax.axhline(r["accuracy_mean"], color=colour, linestyle="--", label=f"{split} non-private")
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8], labels=["1", "3", "8"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"epsilon (delta = {DELTA:g}) per site")
        ax.set_ylabel("global test accuracy")
        ax.set_title(f"{dataset}: {SETTINGS[dataset].num_sites} sites, SecAgg+, {SPARSITY}x sparse")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _override(setting: Setting, assignments: Sequence[str]) -> Setting:
    """Apply ``field=value`` overrides (for tuning) to a setting."""
    changes: dict[str, Any] = {}
    fields = asdict(setting)
    for item in assignments:
        key, _, value = item.partition("=")
        if key not in fields or key == "dataset":
            raise SystemExit(f"--set: unknown field {key!r}; fields: {', '.join(fields)}")
        changes[key] = type(fields[key])(value)
    return replace(setting, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed and half the rounds")
    parser.add_argument("--rounds", type=int, help="rounds per run (default: per dataset)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3, 1 with --quick)")
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument(
        "--epsilons",
        nargs="+",
        default=["1", "3", "8", "none"],
        help="budgets to run; 'none' is the non-private row",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override a Setting field for every dataset (tuning)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--plot", type=Path, help="write a PNG of accuracy against epsilon")
    parser.add_argument("--json", action="store_true", help='print {"rows": [...]} as the last line')
    args = parser.parse_args(argv)

    seeds = args.seeds or (1 if args.quick else 3)
    epsilons = [None if e.lower() == "none" else float(e) for e in args.epsilons]
    runs = []
    for dataset in args.datasets:
        setting = _override(SETTINGS[dataset], args.set)
        rounds = args.rounds or (max(1, setting.rounds // 2) if args.quick else setting.rounds)
        setting = replace(setting, rounds=rounds)
        for split in args.splits:
            for eps in epsilons:
                runs.extend(Run(setting, split, eps, seed) for seed in range(seeds))
    # Longest first (digits, DP) keeps the workers busy to the end.
    runs.sort(key=lambda r: (r.setting.num_sites * r.setting.rounds, r.epsilon is not None), reverse=True)

    started = time.perf_counter()
    results = run_all(runs, args.workers)
    wall = time.perf_counter() - started

    rows = summarise(results)
    print_table(rows)
    print(
        f"{len(runs)} runs in {wall:.0f} s wall ({sum(r['seconds'] for r in results):.0f} s of run time, "
        f"{args.workers} workers)"
    )
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        keys = ("dataset", "split", "epsilon", "accuracy_mean", "accuracy_std")
        print(json.dumps({"rows": [{k: r[k] for k in keys} for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
