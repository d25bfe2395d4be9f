"""The typed fleet messages: a task survives the wire, and a Submit is checked once."""

from __future__ import annotations

import pytest

from coordinator import wire

CONFIG = wire.TaskConfig(local_epochs=2, lr=0.05, batch_size=16, secure_aggregation=True,
                         compression=4.0, error_feedback=True, clip=0.5, max_examples=1e4,
                         threshold=0, residual_decay=1.0)


def _task(**changes: object) -> wire.Task:
    fields = {"federation": "f" * 64, "round": 3, "attempt": 2, "term": 7, "base": "a" * 64,
              "parent": "b" * 64, "seed": "00ff", "participants": ("s1", "s2"),
              "stage": "share", "deadline_s": 12.5, "config": CONFIG,
              "identity_keys": {"s1": "c" * 64}, "payload": {"directory": {"k": 1}}}
    return wire.Task(**{**fields, **changes})  # type: ignore[arg-type]


def test_a_task_round_trips_through_msgpack() -> None:
    task = _task()
    back = wire.Task.from_wire(wire.unpack(wire.pack(task.to_wire())))
    assert back == task and back.session == "3.2.7"
    assert back.config.training(3) == {"local_epochs": 2, "lr": 0.05, "batch_size": 16,
                                       "round": 3}


@pytest.mark.parametrize("change", [
    {"stage": "bogus"}, {"round": -1}, {"round": True}, {"base": "A" * 64}, {"seed": "xyz"},
    {"participants": ["s1", "bad id!"]}, {"config": {"lr": 0.1}}, {"identity_keys": {"s1": 3}},
])
def test_a_malformed_task_is_refused(change: dict) -> None:
    raw = {**_task().to_wire(), **change}
    with pytest.raises(wire.WireError):
        wire.Task.from_wire(raw)


def _submit(**changes: object) -> dict:
    return {"site": "s1", "round": 3, "attempt": 2, "term": 7, "stage": "collect",
            "update": b"\0" * 8, "num_examples": 5, "metrics": {"loss": 1}, **changes}


def test_a_submit_is_typed_once() -> None:
    s = wire.Submit.from_wire(_submit())
    assert s.session == (3, 2, 7) and s.metrics == {"loss": 1.0} and s.num_examples == 5
    back = wire.Submit.from_wire({"site": "s1", **s.to_wire()})
    assert back == s


@pytest.mark.parametrize(("change", "code"), [
    ({"site": "no site"}, "malformed"), ({"round": "3"}, "stale_round"),
    ({"term": -1}, "stale_round"), ({"stage": "later"}, "wrong_stage"),
    ({"metrics": {"loss": float("nan")}}, "malformed"), ({"update": "text"}, "malformed"),
    ({"num_examples": 0}, "malformed"), ({"num_examples": True}, "malformed"),
    ({"secagg": [1]}, "malformed"),
    ({"metrics": {"eval_accuracy": 1e300}}, "out_of_range"),
    ({"metrics": {"eval_accuracy": 1.5}}, "out_of_range"),
    ({"metrics": {"train_loss": -0.1}}, "out_of_range"),
    ({"metrics": {"steps": 2e9}}, "out_of_range"),
    ({"metrics": {"<script>": 1}}, "out_of_range"),
])
def test_a_malformed_submit_names_its_code(change: dict, code: str) -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.Submit.from_wire(_submit(**change))
    assert exc.value.code == code
    assert exc.value.reply() == {"ok": False, "code": code, "error": exc.value.message}


def test_honest_site_metrics_pass_the_range_check() -> None:
    metrics = {"eval_accuracy": 0.93, "eval_loss": 0.2, "train_loss": 0.0, "steps": 120,
               "noise_multiplier": 1.1, "sample_rate": 0.05, "clip_norm": 1.0, "delta": 1e-5,
               "num-examples": 57}
    assert wire.Submit.from_wire(_submit(metrics=metrics)).metrics == {
        k: float(v) for k, v in metrics.items()}
