"""A plain Flower ClientApp for the breast cancer task, as a Flower user writes one.

Nothing here knows about fedraft: it is the usual Message-API app (``@app.train()``,
``@app.evaluate()``), reading its data partition from ``context.node_config``
(``"partition-id"``, ``"num-partitions"``) and its defaults from ``context.run_config``.
Host it with::

    FlowerAppTrainer("client.examples.flower_breast_cancer:app",
                     run_config={"local-epochs": 2},
                     node_config={"partition-id": 0, "num-partitions": 5})

``client.data.site_data`` stands in for the site's own data loading code. The app also
answers ``query.initial_parameters`` so a host can ask it for version-0 weights.

run_config keys (all optional): ``lr`` (0.05), ``local-epochs`` (2), ``batch-size``
(16), ``partition-method`` ("iid" or "dirichlet", default "iid"), ``dirichlet-alpha``
(0.5), ``seed`` (0). A train message's ``"config"`` may override ``lr``,
``local_epochs``/``local-epochs`` and ``batch_size``/``batch-size`` per round.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import torch  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client.training.data import SiteData, site_data  # noqa: E402

app = ClientApp()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(30, 32)
        self.fc2 = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


_partitions: dict[tuple, SiteData] = {}


def load_data(context: Context) -> SiteData:
    """This node's partition; cached, since the app lives as long as its host."""
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    method = str(context.run_config.get("partition-method", "iid"))
    alpha = float(context.run_config.get("dirichlet-alpha", 0.5))
    seed = int(context.run_config.get("seed", 0))
    key = (pid, num, method, alpha, seed)
    if key not in _partitions:
        _partitions[key] = site_data("breast_cancer", pid, num, method, alpha, seed)
    return _partitions[key]


def _setting(msg: Message, context: Context, names: tuple[str, ...], default):
    config = msg.content["config"] if "config" in msg.content else {}
    for name in names:
        if name in config:
            return config[name]
    for name in names:
        if name in context.run_config:
            return context.run_config[name]
    return default


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = load_data(context)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    lr = float(_setting(msg, context, ("lr",), 0.05))
    epochs = int(_setting(msg, context, ("local_epochs", "local-epochs"), 2))
    batch_size = int(_setting(msg, context, ("batch_size", "batch-size"), 16))

    # Keep a round counter in the context so each round shuffles differently.
    rounds_done = int(context.state["progress"]["rounds"]) if "progress" in context.state else 0
    generator = torch.Generator().manual_seed(1000 * int(context.node_config["partition-id"]) + rounds_done)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()
    running, seen = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(yb)
            seen += len(yb)

    context.state["progress"] = ConfigRecord({"rounds": rounds_done + 1})
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": running / max(seen, 1), "num-examples": len(data.y_train)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data = load_data(context)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.eval()
    x, y = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("initial_parameters")
def send_initial_parameters(msg: Message, context: Context) -> Message:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(context.run_config.get("seed", 0)))
        model = Net()
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict())}), reply_to=msg)
