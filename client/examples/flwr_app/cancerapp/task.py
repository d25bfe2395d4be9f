"""cancerapp: the model, this node's share of the data, and the train and test loops."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[np.ndarray, np.ndarray]


class Net(nn.Module):
    """A small MLP: 30 tumour measurements in, malignant/benign scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=8)
def _partition(partition_id: int, num_partitions: int) -> tuple[Split, Split]:
    """This node's rows: one fixed shuffle cut into `num_partitions` shards, then 80/20.

    Each node standardises with its own training rows, as a real site would."""
    features, labels = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(42).permutation(len(labels))
    rows = np.array_split(order, num_partitions)[partition_id]
    x, y = features[rows], labels[rows]
    cut = int(0.8 * len(y))
    mean, std = x[:cut].mean(axis=0), x[:cut].std(axis=0) + 1e-6
    x = ((x - mean) / std).astype(np.float32)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _loader(split: Split, batch_size: int, shuffle: bool) -> DataLoader:
    x, y = split
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def load_data(partition_id: int, num_partitions: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of one partition of scikit-learn's bundled breast-cancer data."""
    train_split, test_split = _partition(partition_id, num_partitions)
    return _loader(train_split, batch_size, True), _loader(test_split, batch_size, False)


def train(net: Net, loader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Train in place with SGD; return the mean training loss over all batches."""
    net.to(device)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
    return total / max(seen, 1)


def test(net: Net, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy on `loader`."""
    net.to(device)
    net.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = net(x)
            loss += criterion(logits, y).item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += len(y)
    return loss / max(seen, 1), correct / max(seen, 1)
