"""A Flower ClientApp hosted in-process through FlowerAppTrainer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.examples import flower_breast_cancer
from client.training.flower_app import load_client_app
from client.training.flower_host import FlowerAppError, FlowerAppTrainer
from client.training.tasks import evaluate_global

APP_REF = "client.examples.flower_breast_cancer:app"


def example_trainer(pid: int = 0, num: int = 5, **run_config) -> FlowerAppTrainer:
    return FlowerAppTrainer(
        APP_REF, run_config=run_config, node_config={"partition-id": pid, "num-partitions": num}
    )


def test_flower_telemetry_is_off() -> None:
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    from flwr.supercore import telemetry

    assert telemetry.FLWR_TELEMETRY_ENABLED == "0"


def test_example_app_trains_in_process() -> None:
    trainer = example_trainer(pid=1)
    assert trainer.app is flower_breast_cancer.app  # the very object, not a copy
    params = trainer.initial_parameters()  # from the app's query.initial_parameters
    assert list(params) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(v.dtype == np.float32 for v in params.values())

    site = flower_breast_cancer.load_data(trainer.context)
    losses = []
    current = params
    for rnd in range(3):
        result = trainer.fit(current, {"round": rnd, "lr": 0.05, "local_epochs": 2})
        assert list(result.params) == list(params)
        assert all(result.params[k].shape == params[k].shape for k in params)
        assert all(result.params[k].dtype == np.float32 for k in params)
        assert not all(np.array_equal(result.params[k], current[k]) for k in params)
        assert result.num_examples == site.num_train
        losses.append(result.metrics["train_loss"])
        current = result.params
    assert losses[-1] < losses[0]

    before = trainer.evaluate(params, {"round": 3})
    after = trainer.evaluate(current, {"round": 3})
    assert after.num_examples == site.num_test
    assert after.loss < before.loss
    assert set(after.metrics) == {"accuracy"} and after.metrics["accuracy"] >= 0.8

    # one long-lived app and Context: the app's own round counter kept counting
    assert trainer.context.state["progress"]["rounds"] == 3
    assert trainer.calls == 1 + 3 + 2


def test_fedavg_through_the_hosted_app_learns() -> None:
    sites = [example_trainer(pid=i, num=3) for i in range(3)]
    params = sites[0].initial_parameters()
    start = evaluate_global(
        "breast_cancer",
        {
            "net.0.weight": params["fc1.weight"],
            "net.0.bias": params["fc1.bias"],
            "net.2.weight": params["fc2.weight"],
            "net.2.bias": params["fc2.bias"],
        },
    )
    for rnd in range(3):
        results = [s.fit(params, {"round": rnd}) for s in sites]
        total = sum(r.num_examples for r in results)
        params = {
            k: (sum(r.params[k] * r.num_examples for r in results) / total).astype(np.float32) for k in params
        }
    # the example's Net has the built-in task's shapes under other names
    end = evaluate_global(
        "breast_cancer",
        {
            "net.0.weight": params["fc1.weight"],
            "net.0.bias": params["fc1.bias"],
            "net.2.weight": params["fc2.weight"],
            "net.2.bias": params["fc2.bias"],
        },
    )
    assert end >= 0.9 and end > start


# --- a probe app: which process, which app object, which Context served each call -----

probe_app = ClientApp()
probe_log: list[tuple[int, int, int, str, dict]] = []


@probe_app.train()
def _probe_train(msg: Message, context: Context) -> Message:
    probe_log.append(
        (os.getpid(), id(probe_app), id(context), msg.metadata.group_id, dict(msg.content["config"]))
    )
    arrays = msg.content["arrays"]
    doubled = ArrayRecord()
    for name, arr in arrays.items():
        doubled[name] = Array(arr.numpy() * 2)
    metrics = MetricRecord({"num-examples": 7, "train_loss": 0.5})
    return Message(RecordDict({"arrays": doubled, "metrics": metrics}), reply_to=msg)


@probe_app.evaluate()
def _probe_evaluate(msg: Message, context: Context) -> Message:
    probe_log.append((os.getpid(), id(probe_app), id(context), msg.metadata.group_id, {}))
    metrics = MetricRecord({"num-examples": 3, "loss": 0.25, "accuracy": 0.5, "auc": 0.75})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def test_one_app_object_one_process_one_context_across_calls() -> None:
    probe_log.clear()
    trainer = FlowerAppTrainer(
        "tests.client.test_flower_host:probe_app", {}, {}, initial_parameters=lambda: {"w": np.ones((2, 3))}
    )
    assert trainer.app is probe_app
    params = trainer.initial_parameters()
    assert params["w"].dtype == np.float32 and params["w"].shape == (2, 3)
    for rnd in range(4):
        params = trainer.fit(params, {"round": rnd, "lr": 0.1}).params
    ev = trainer.evaluate(params, {"round": 4})
    assert np.array_equal(params["w"], np.full((2, 3), 16.0, np.float32))
    assert (ev.loss, ev.num_examples, ev.metrics) == (0.25, 3, {"accuracy": 0.5, "auc": 0.75})
    assert len(probe_log) == 5
    assert {entry[0] for entry in probe_log} == {os.getpid()}  # no process per message
    assert {entry[1] for entry in probe_log} == {id(probe_app)}
    assert {entry[2] for entry in probe_log} == {id(trainer.context)}
    assert [entry[3] for entry in probe_log] == ["0", "1", "2", "3", "4"]
    assert probe_log[0][4] == {"round": 0, "lr": 0.1, "server-round": 0}  # as Flower's strategies add


# --- the contract is enforced with clear errors ---------------------------------------


def _app_replying(build_reply) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return build_reply(msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return build_reply(msg)

    return app


PARAMS = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
GOOD_METRICS = MetricRecord({"num-examples": 5})


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        content["metrics"] = metrics
    return Message(content, reply_to=msg)


def _arrays(**named: np.ndarray) -> ArrayRecord:
    record = ArrayRecord()
    for k, v in named.items():
        record[k] = Array(v)
    return record


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda m: _reply(m, None, GOOD_METRICS), "lacks the 'arrays'"),
        (lambda m: _reply(m, _arrays(a=np.zeros((2, 2), np.float32)), GOOD_METRICS), "missing \\['b'\\]"),
        (
            lambda m: _reply(
                m, _arrays(a=np.zeros((4,), np.float32), b=np.zeros(3, np.float32)), GOOD_METRICS
            ),
            "'a' has shape \\(4,\\), expected \\(2, 2\\)",
        ),
        (
            lambda m: _reply(
                m,
                _arrays(a=np.zeros((2, 2), np.float32), b=np.zeros(3, np.float32), c=np.zeros(1, np.float32)),
                GOOD_METRICS,
            ),
            "unexpected \\['c'\\]",
        ),
        (lambda m: _reply(m, _arrays(**PARAMS), None), "lacks the 'metrics'"),
        (lambda m: _reply(m, _arrays(**PARAMS), MetricRecord({"loss": 1.0})), "lacks 'num-examples'"),
        (lambda m: _reply(m, _arrays(**PARAMS), MetricRecord({"num-examples": 2.5})), "non-negative integer"),
        (lambda m: Message(Error(code=0, reason="disk full"), reply_to=m), "disk full"),
        (lambda m: "not a message", "expected a flwr Message"),
    ],
)
def test_bad_train_replies_raise_clear_errors(build, pattern: str) -> None:
    trainer = FlowerAppTrainer(_app_replying(build))
    with pytest.raises(FlowerAppError, match=pattern):
        trainer.fit(PARAMS, {"round": 1})


def test_evaluate_needs_a_loss() -> None:
    trainer = FlowerAppTrainer(_app_replying(lambda m: _reply(m, None, GOOD_METRICS)))
    with pytest.raises(FlowerAppError, match="'loss'"):
        trainer.evaluate(PARAMS, {})


def test_app_exceptions_are_wrapped() -> None:
    def explode(msg: Message) -> Message:
        raise RuntimeError("CUDA out of memory")

    trainer = FlowerAppTrainer(_app_replying(explode))
    with pytest.raises(FlowerAppError, match="CUDA out of memory") as info:
        trainer.fit(PARAMS, {})
    assert isinstance(info.value.__cause__, RuntimeError)


def test_app_without_evaluate_handler() -> None:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return Message(msg.content, reply_to=msg)

    with pytest.raises(FlowerAppError, match="No evaluate function registered"):
        FlowerAppTrainer(app).evaluate(PARAMS, {})


def test_no_initial_parameters_convention_is_a_clear_error() -> None:
    trainer = FlowerAppTrainer(probe_app)
    with pytest.raises(FlowerAppError, match="initial_parameters"):
        trainer.initial_parameters()


def test_initial_parameters_are_asked_once() -> None:
    trainer = example_trainer()
    first = trainer.initial_parameters()
    calls = trainer.calls
    second = trainer.initial_parameters()
    assert trainer.calls == calls == 1
    assert all(np.array_equal(first[k], second[k]) for k in first)
    second["fc1.bias"][:] = 99.0  # callers get copies
    assert not np.array_equal(trainer.initial_parameters()["fc1.bias"], second["fc1.bias"])


@pytest.mark.parametrize(
    "ref",
    [
        "no_colon",
        "client.examples.nope:app",
        "client.examples.flower_breast_cancer:nope",
        "client.examples.flower_breast_cancer:Net",
    ],
)
def test_bad_app_references(ref: str) -> None:
    with pytest.raises(FlowerAppError):
        load_client_app(ref)


def test_config_conversion() -> None:
    probe_log.clear()
    trainer = FlowerAppTrainer(probe_app)
    trainer.fit(
        {"w": np.ones(2, np.float32)},
        {
            "round": np.int64(3),
            "lr": np.float32(0.5),
            "skip": None,
            "dp": {"clip": 1.0},
            "ids": [1, 2],
            "name": "x",
        },
    )
    config = probe_log[-1][4]
    assert config == {"round": 3, "lr": 0.5, "dp.clip": 1.0, "ids": [1, 2], "name": "x", "server-round": 3}
    assert type(config["round"]) is int and type(config["server-round"]) is int
    with pytest.raises(TypeError, match="ConfigRecord"):
        trainer.fit({"w": np.ones(2, np.float32)}, {"bad": object()})
    with pytest.raises(TypeError):
        trainer.fit({"w": np.ones(2, np.float32)}, {"mixed": [1, "a"]})
