"""Record-level DP-SGD (Opacus) for the built-in tasks: ``DPTorchTrainer``.

Each site runs DP-SGD (Opacus) on its own records,
so every patient or customer is protected against everything that leaves the site:
the masked update, the aggregate and every later model. One ``PrivacyEngine`` serves
the site's whole training and is made private once (``make_private`` every round
double-wraps the model and breaks accounting, Opacus issues #688/#608); each round
loads the global weights into the wrapped model and resets the optimizer state. The
accountant history is the site's privacy ledger: one ``DPStep`` per round, persisted
atomically in a JSON file and reloaded at start, so a restarted agent continues the
same accounting instead of starting from zero. A round that would take the site past
its budget is refused before any record is touched (``BudgetExceeded``), and the
ledger entry is written *before* training (write-ahead), so a crash mid-round can only
over-count, never under-count.

The guarantee depends on the randomness being unpredictable. Opacus's ``secure_mode``
needs torchcsprng, which has no build for current torch, so noise and sampling come
from torch's generators seeded from ``os.urandom`` (or from ``seed`` for reproducible
simulations and tests, which must never be used in production).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.config import PrivacyConfig
from client.dp.ledger import LedgerBacked, PrivacyLedger
from client.training.protocols import ChargePreview, EvalResult, FitResult, Parameters
from client.training.tasks import TorchTaskTrainer, get_parameters, set_parameters
from privacy.accounting import DPStep, accountant_history


def _steps_per_epoch(sample_rate: float) -> int:
    """Opacus runs 1/q Poisson batches per epoch and accounts q = 1/len(loader), so q
    must be 1/k for the ledger to describe what actually ran."""
    k = round(1.0 / sample_rate)
    if k < 1 or abs(k * sample_rate - 1.0) > 1e-9:
        raise ValueError(
            f"sample_rate must be 1/k for an integer k (Opacus samples 1/q batches an epoch "
            f"and accounts q = 1/k); got {sample_rate}, nearest is 1/{max(k, 1)}"
        )
    return k


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "big") >> 1 if seed is None else seed)
    return gen


class DPTorchTrainer(LedgerBacked):
    """A ``LocalTrainer`` that trains a built-in task with record-level DP-SGD.

    ``epsilon``/``delta`` is the site's total budget over all rounds; the noise
    multiplier is the smallest that fits ``planned_rounds`` rounds of ``local_epochs``
    epochs (default: the task's) into what is left of it (``noise_multiplier_for``), computed once
    and kept in the state file so a restart keeps the same sigma unless the plan
    (budget, delta, sample rate, clip, rounds, steps per round) changed.

    Sampling is Poisson with rate ``sample_rate`` = 1/k (default 1/ceil(n / batch_size)
    with the task's default batch size, which is what Opacus picks for a DataLoader of
    that batch size, about batch_size / n); a round runs ``local_epochs * k`` steps.
    The round config may change ``lr``, ``momentum``, ``weight_decay`` and
    ``local_epochs`` (more epochs cost more epsilon: the check uses the real step
    count); ``batch_size`` is ignored (the sample rate is fixed by the plan) and
    ``optimizer`` must stay the one the trainer was built with.
    """

    def __init__(
        self,
        task_trainer: TorchTaskTrainer,
        epsilon: float,
        delta: float,
        planned_rounds: int,
        state_path: Path | str,
        clip_norm: float = 1.0,
        sample_rate: float | None = None,
        *,
        local_epochs: int | None = None,
        seed: int | None = None,
    ) -> None:
        self._task = task_trainer
        self._seed = seed
        self._lock = threading.Lock()

        model = task_trainer.model
        model.train()
        try:
            ModuleValidator.validate(model, strict=True)
        except UnsupportedModuleError as exc:
            raise ValueError(
                f"model of task {task_trainer.task_name!r} cannot be trained with DP-SGD: {exc}. "
                "BatchNorm mixes records of a batch; use GroupNorm (num_groups=1 kept accuracy "
                "best here) or opacus ModuleValidator.fix"
            ) from exc

        x, y = task_trainer.train_tensors()
        n = int(y.shape[0])
        if n < 1:
            raise ValueError("the site has no training records")
        defaults = task_trainer.hyperparameters({})
        self._optimizer_kind = defaults.optimizer
        if sample_rate is None:
            self._k = math.ceil(n / defaults.batch_size)
            self._q = 1.0 / self._k
        else:
            self._k = _steps_per_epoch(float(sample_rate))
            self._q = float(sample_rate)
        planned_epochs = defaults.local_epochs if local_epochs is None else local_epochs
        if isinstance(planned_epochs, bool) or not isinstance(planned_epochs, int) or planned_epochs < 1:
            raise ValueError(f"local_epochs must be an int >= 1, got {planned_epochs!r}")
        self._planned_epochs = planned_epochs
        self.ledger = PrivacyLedger(
            state_path, epsilon, delta, planned_rounds, clip_norm,
            sample_rate=self._q, steps_per_round=planned_epochs * self._k,
            header={"task": task_trainer.task_name, "num_train": task_trainer.site.num_train},
        )

        self._sample_gen = _new_generator(
            torch.device("cpu"), None if seed is None else _derive_seed(seed, "sample")
        )
        self._noise_gen = _new_generator(
            task_trainer.device, None if seed is None else _derive_seed(seed, "noise")
        )
        # A DataLoader whose length is exactly k, so Opacus derives q = 1/k; its
        # DPDataLoader replaces the batches with Poisson samples of rate q.
        chunks = [c.tolist() for c in np.array_split(np.arange(n), self._k)]
        loader = DataLoader(TensorDataset(x, y), batch_sampler=chunks, generator=self._sample_gen)
        with warnings.catch_warnings():  # "Secure RNG turned off": see the module docstring
            warnings.simplefilter("ignore", UserWarning)
            self.privacy_engine = PrivacyEngine(accountant="prv", secure_mode=False)
        # Continue the site's accounting: Opacus's own accountant starts from the ledger.
        self.privacy_engine.accountant.history = list(accountant_history(self.ledger.history))
        self._model, self._optimizer, dp_loader = self.privacy_engine.make_private(
            module=model,
            optimizer=task_trainer.make_optimizer(defaults),
            data_loader=loader,
            noise_multiplier=self.ledger.sigma,
            max_grad_norm=self.ledger.clip_norm,
            poisson_sampling=True,
            noise_generator=self._noise_gen,
        )
        self._sampler = dp_loader.batch_sampler
        if abs(dp_loader.sample_rate - self._q) > 1e-12:  # pragma: no cover - opacus changed
            raise RuntimeError(f"Opacus sample rate {dp_loader.sample_rate} != planned {self._q}")

    # ------------------------------------------------------------------ accounting

    def _epochs(self, config: Mapping[str, Any]) -> int:
        """The round's local epochs: the config's, else the planned ones."""
        epochs = int(config.get("local_epochs", self._planned_epochs))
        if epochs < 0:
            raise ValueError(f"local_epochs must be >= 0, got {epochs}")
        return epochs

    def _round_step(self, config: Mapping[str, Any]) -> DPStep:
        ledger = self.ledger
        return DPStep(ledger.sigma, ledger.sample_rate, self._epochs(config) * self._k, ledger.clip_norm)

    def preview_charge(self, config: Mapping[str, Any]) -> ChargePreview:
        """The round's mechanism and epsilon charge for ``config``, without training, so
        the agent can decline a round it cannot afford before the key exchange."""
        return self.ledger.preview(self._round_step(config))

    # --------------------------------------------------------------- LocalTrainer

    def initial_parameters(self) -> Parameters:
        return self._task.initial_parameters()

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        with self._lock:
            return self._task.evaluate(params, config)

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        with self._lock:
            return self._fit(params, config)

    def _fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        hp = self._task.hyperparameters(config)
        if not hp.lr > 0:
            raise ValueError(f"invalid training config: {hp}")
        if hp.optimizer != self._optimizer_kind:
            raise ValueError(
                f"the DP optimizer was built as {self._optimizer_kind!r}; a round cannot switch "
                f"it to {hp.optimizer!r}"
            )
        step = self._round_step(config)
        # Write-ahead: the charge is on disk before any record is used.
        spent = self.ledger.charge(step)

        set_parameters(self._task.model, params)
        optimizer = self._optimizer
        optimizer.state.clear()  # fresh optimizer state every round, as TorchTaskTrainer
        for group in optimizer.param_groups:
            group["lr"] = hp.lr
            group["weight_decay"] = hp.weight_decay
            if "momentum" in group:
                group["momentum"] = hp.momentum
        shuffle = self._task.shuffle_seed(config)
        if self._seed is not None:  # reproducible runs: per trainer, round and purpose
            self._sample_gen.manual_seed(_derive_seed(self._seed, shuffle, "sample"))
            self._noise_gen.manual_seed(_derive_seed(self._seed, shuffle, "noise"))

        x, y = self._task.train_tensors()
        steps_before = sum(n for _, _, n in self.privacy_engine.accountant.history)
        self._model.train()
        total_loss, seen = 0.0, 0
        with warnings.catch_warnings():
            # Opacus's hooks on a model whose inputs need no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(self._epochs(config)):
                for batch in self._sampler:  # Poisson batches; an empty one is still a step
                    idx = torch.as_tensor(batch, dtype=torch.int64, device=x.device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(self._model(x[idx]), y[idx])
                    loss.backward()
                    optimizer.step()
                    if len(batch):
                        total_loss += float(loss.detach()) * len(batch)
                        seen += len(batch)
        optimizer.zero_grad(set_to_none=True)
        ran = sum(n for _, _, n in self.privacy_engine.accountant.history) - steps_before
        if ran != step.steps:  # pragma: no cover - would mean the ledger is wrong
            raise RuntimeError(f"ran {ran} DP-SGD steps, the ledger recorded {step.steps}")

        metrics = {
            "train_loss": total_loss / seen if seen else float("nan"),
            **self.ledger.release_metrics(step, spent),
        }
        return FitResult(
            params=get_parameters(self._task.model),
            num_examples=self._task.site.num_train,
            metrics=metrics,
        )


def site_dp_sgd(task_trainer: TorchTaskTrainer, privacy: PrivacyConfig,
                state_dir: Path) -> DPTorchTrainer:
    """A site's built-in task inside record-level DP-SGD with its [privacy] settings: one
    PrivacyEngine for the site's whole training, its accountant history in the state dir
    (`dp-accountant.json`), so a restarted agent, or a virtual site made again for its
    next round, continues it."""
    return DPTorchTrainer(task_trainer, epsilon=privacy.epsilon, delta=privacy.delta,
                          planned_rounds=privacy.planned_rounds,
                          state_path=Path(state_dir) / "dp-accountant.json",
                          clip_norm=privacy.clip_norm, sample_rate=privacy.sample_rate,
                          local_epochs=privacy.local_epochs)
