"""Built-in torch tasks: small models over the bundled datasets, as ``LocalTrainer``s.

One or more tasks per dataset in ``client.data`` (``TASK_DATASET`` maps a task to the
dataset it trains on):

- ``"breast_cancer"``: MLP 30 -> 32 -> 2 (a hospital's tabular task).
- ``"digits"``: CNN for 1x8x8 images, 10 classes.
- ``"digits_small"``: the digits data with fixed (untrained) edge features and one trained
  Linear (5,770 parameters), for DP-SGD.
- ``"mnist"``: CNN for 1x28x28 images, 10 classes.

No model uses BatchNorm: per-batch statistics mix records, which record-level DP-SGD
(Opacus) forbids, and its running buffers would have to be federated too. The CNNs use
GroupNorm where normalisation helps.

Training hyperparameters come from the round ``config`` (``lr``, ``local_epochs``,
``batch_size``, ``optimizer``, ``momentum``, ``weight_decay``); what the config leaves
out falls back to ``TASK_DEFAULTS[task]``. The defaults were chosen so that FedAvg over
five sites reaches the accuracies checked in ``tests/client/test_tasks.py`` with margin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

from client.training.data import SiteData, global_test_data, site_data
from client.training.protocols import EvalResult, FitResult, Parameters

TASKS: tuple[str, ...] = ("breast_cancer", "digits", "digits_small", "mnist")

TASK_DATASET: dict[str, str] = {"digits_small": "digits"}
"""Tasks whose dataset in ``client.data`` has another name; every other task trains on
the dataset of its own name."""


def task_dataset(task: str) -> str:
    """The ``client.data`` dataset that ``task`` trains and is scored on."""
    return TASK_DATASET.get(task, task)


@dataclass(frozen=True)
class TaskDefaults:
    lr: float
    local_epochs: int
    batch_size: int
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0


TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "breast_cancer": TaskDefaults(lr=0.05, local_epochs=2, batch_size=16),
    "digits": TaskDefaults(lr=0.05, local_epochs=2, batch_size=32),
    "digits_small": TaskDefaults(lr=0.1, local_epochs=2, batch_size=32),
    "mnist": TaskDefaults(lr=0.05, local_epochs=1, batch_size=32),
}


class BreastCancerMLP(nn.Module):
    def __init__(self, in_features: int = 30, hidden: int = 32, num_classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """1x8x8 -> conv 16 -> conv 32 -> pool 4x4 -> 64 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _edge_filters() -> torch.Tensor:
    """Four fixed 3x3 Sobel filters (0, 45, 90 and 135 degrees), shape (4, 1, 3, 3)."""
    horizontal = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
    diagonal = [[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0], [-2.0, -1.0, 0.0]]
    h, d = torch.tensor(horizontal), torch.tensor(diagonal)
    return torch.stack([h, d, h.T.contiguous(), d.flip(0)]).unsqueeze(1)


class DigitsFeatures(nn.Module):
    """1x8x8 -> fixed features -> Linear -> 10 (Tramer & Boneh 2021: DP needs better features).

    The features are data-independent: fixed 3x3 Sobel edge filters at four orientations
    (0/45/90/135 degrees), each response split into its positive and negative halves
    (ReLU of +r and -r: eight directed edges), kept at full 8x8 resolution (512) and
    concatenated with the 64 raw pixels, then normalised per image (layer norm without
    affine). Only the Linear (576 -> 10, 5,770 parameters) trains; the filters are a
    non-persistent buffer, outside ``state_dict()``. Under DP (bench_privacy digits, 10
    sites, iid, epsilon 3, lr 5, seeds 0-5) this reached 0.878 where |r| (3,210
    parameters) reached 0.876 at its best lr, 2x2-pooled edges 0.863, the plain linear
    model 0.830, and every CNN tried did worse still: resolution matters more than the
    extra noise of more coordinates.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("filters", _edge_filters(), persistent=False)
        self.classifier = nn.Linear(8 * 8 + 2 * 4 * 8 * 8, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        edges = nn.functional.conv2d(x, self.filters, padding=1)  # (n, 4, 8, 8)
        directed = torch.cat([nn.functional.relu(edges), nn.functional.relu(-edges)], dim=1)
        f = torch.cat([x.flatten(1), directed.flatten(1)], dim=1)
        return nn.functional.layer_norm(f, f.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MnistCNN(nn.Module):
    """1x28x28 -> conv5 16 -> pool -> conv5 32 -> pool -> 64 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_MODELS: dict[str, Callable[[], nn.Module]] = {
    "breast_cancer": BreastCancerMLP,
    "digits": DigitsCNN,
    "digits_small": DigitsFeatures,
    "mnist": MnistCNN,
}


def _check_task(task: str) -> None:
    if task not in _MODELS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def build_model(task: str, seed: int = 0) -> nn.Module:
    """A freshly initialised model for ``task``; the weights depend only on ``seed``.

    The global torch RNG is forked, so building a model neither reads nor disturbs it.
    """
    _check_task(task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[task]()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def get_parameters(model: nn.Module) -> Parameters:
    """``model.state_dict()`` as float32 numpy arrays on the CPU, in model order."""
    return {
        name: tensor.detach().to("cpu", copy=True).numpy().astype(np.float32, copy=False)
        for name, tensor in model.state_dict().items()
    }


def set_parameters(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load ``params`` into ``model``; names and shapes must match exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in params]
    extra = [k for k in params if k not in own]
    if missing or extra:
        raise ValueError(f"parameter names do not match the model: missing {missing}, unexpected {extra}")
    new_state = {}
    for name, current in own.items():
        value = np.asarray(params[name])
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(value.shape)}, model expects {tuple(current.shape)}"
            )
        new_state[name] = torch.as_tensor(
            np.ascontiguousarray(value, dtype=np.float32), device=current.device
        ).to(current.dtype)
    model.load_state_dict(new_state)


def _evaluate_arrays(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    n = int(y.shape[0])
    if n == 0:
        return float("nan"), float("nan")
    model.eval()
    total_loss = 0.0
    correct = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size]
            yb = y[start : start + batch_size]
            logits = model(xb)
            total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return total_loss / n, correct / n


class TorchTaskTrainer:
    """A ``LocalTrainer`` for one built-in task on one site's records.

    The model and the site's tensors live on ``device`` for the trainer's lifetime;
    every ``fit``/``evaluate`` loads the given parameters first, so calls are
    independent of each other. Determinism: initial weights depend only on ``seed``;
    the batch order of a ``fit`` depends on ``seed``, ``config["round"]`` (or, when
    the config has no round, on how many fits came before) and ``config["round_seed"]``
    if present, so the same calls in the
    same order give the same results (bit for bit on CPU).

    A fresh optimizer is built for every ``fit``: the model that comes back is a
    function of the global parameters and the site's data, never of earlier rounds'
    optimizer state.
    """

    def __init__(
        self,
        task_name: str,
        site_data: SiteData,
        device: str | torch.device = "auto",
        seed: int = 0,
    ) -> None:
        _check_task(task_name)
        self.task_name = task_name
        self.site = site_data
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.defaults = TASK_DEFAULTS[task_name]
        self.model = build_model(task_name, self.seed).to(self.device)
        self._initial = get_parameters(self.model)
        self._x_train = torch.as_tensor(site_data.x_train, dtype=torch.float32, device=self.device)
        self._y_train = torch.as_tensor(site_data.y_train, dtype=torch.int64, device=self.device)
        self._x_test = torch.as_tensor(site_data.x_test, dtype=torch.float32, device=self.device)
        self._y_test = torch.as_tensor(site_data.y_test, dtype=torch.int64, device=self.device)
        self._fits = 0

    def initial_parameters(self) -> Parameters:
        return {k: v.copy() for k, v in self._initial.items()}

    def _hyper(self, config: Mapping[str, Any]) -> TaskDefaults:
        d = self.defaults
        return TaskDefaults(
            lr=float(config.get("lr", d.lr)),
            local_epochs=int(config.get("local_epochs", d.local_epochs)),
            batch_size=int(config.get("batch_size", d.batch_size)),
            optimizer=str(config.get("optimizer", d.optimizer)),
            momentum=float(config.get("momentum", d.momentum)),
            weight_decay=float(config.get("weight_decay", d.weight_decay)),
        )

    def hyperparameters(self, config: Mapping[str, Any]) -> TaskDefaults:
        """The round's hyperparameters (``config`` over the task defaults), read the same
        way by wrappers that run their own loop (``client.dp.record_level.DPTorchTrainer``)."""
        return self._hyper(config)

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's local train records ``(x, y)`` on ``self.device`` (not copies), for
        wrappers that run their own training loop."""
        return self._x_train, self._y_train

    def shuffle_seed(self, config: Mapping[str, Any]) -> int:
        """Seed of one fit's sampling (see ``_shuffle_seed``), for wrappers that sample
        their own batches; advances the fit counter like ``fit`` does."""
        return self._shuffle_seed(config)

    def make_optimizer(self, hp: TaskDefaults) -> torch.optim.Optimizer:
        params = self.model.parameters()
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        raise ValueError(f"unknown optimizer {hp.optimizer!r}; use 'sgd' or 'adam'")

    def _shuffle_seed(self, config: Mapping[str, Any]) -> int:
        """Seed of this fit's batch order: the trainer's seed, the round (or the count of
        earlier fits when the config has none) and ``round_seed`` when the round has one."""
        stream = config.get("round")
        if stream is None:
            stream = self._fits
        self._fits += 1
        material = repr((self.seed, str(stream), str(config.get("round_seed", ""))))
        return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big") >> 1

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        hp = self._hyper(config)
        if hp.local_epochs < 0 or hp.batch_size < 1 or not hp.lr > 0:
            raise ValueError(f"invalid training config: {hp}")
        set_parameters(self.model, params)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self._shuffle_seed(config))

        optimizer = self.make_optimizer(hp)
        n = self.site.num_train
        self.model.train()
        total = torch.zeros((), device=self.device)
        seen = 0
        for _ in range(hp.local_epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, hp.batch_size):
                batch = order[start : start + hp.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(self.model(self._x_train[batch]), self._y_train[batch])
                loss.backward()
                optimizer.step()
                total += loss.detach() * batch.shape[0]
                seen += int(batch.shape[0])
        train_loss = float(total) / seen if seen else float("nan")
        return FitResult(
            params=get_parameters(self.model),
            num_examples=n,
            metrics={"train_loss": train_loss},
        )

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        set_parameters(self.model, params)
        loss, acc = _evaluate_arrays(self.model, self._x_test, self._y_test)
        return EvalResult(loss=loss, num_examples=self.site.num_test, metrics={"accuracy": acc})

    def evaluate_train(self, params: Parameters) -> EvalResult:
        """Loss and accuracy of ``params`` on the site's local train set."""
        set_parameters(self.model, params)
        loss, acc = _evaluate_arrays(self.model, self._x_train, self._y_train)
        return EvalResult(loss=loss, num_examples=self.site.num_train, metrics={"accuracy": acc})


def make_trainer(
    task: str,
    *,
    site_index: int = 0,
    num_sites: int = 1,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "auto",
    site: SiteData | None = None,
) -> TorchTaskTrainer:
    """A trainer for built-in ``task`` on one simulated site.

    The site's records are ``client.data.site_data(task_dataset(task), site_index,
    num_sites, method, alpha, seed)`` unless ``site`` is given. ``seed`` also seeds the model's initial
    weights, so all sites of one run built with the same seed agree on version 0.
    """
    _check_task(task)
    if site is None:
        site = site_data(task_dataset(task), site_index, num_sites, method, alpha, seed)
    elif site.name != task_dataset(task):
        raise ValueError(f"site data is for {site.name!r}, not {task_dataset(task)!r} (task {task!r})")
    return TorchTaskTrainer(task, site, device=device, seed=seed)


@cache
def _global_test_tensors(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = global_test_data(task_dataset(task))
    return torch.as_tensor(x), torch.as_tensor(y)


def evaluate_global(task: str, params: Parameters) -> float:
    """Accuracy of ``params`` on the task's global held-out test split (on the CPU)."""
    _check_task(task)
    model = build_model(task)
    set_parameters(model, params)
    x, y = _global_test_tensors(task)
    return _evaluate_arrays(model, x, y)[1]
