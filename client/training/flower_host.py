"""Host a Flower Message-API ``ClientApp`` in-process, as a ``LocalTrainer``.

Sites that already have Flower training code keep it: the agent loads their
``ClientApp`` once, keeps it (and one Flower ``Context``) for the life of the process,
and calls it directly for every round. No SuperLink, no SuperNode, no process per
message: a call is a Python function call on the arrays the agent already holds.

The app (``resolve_app``): a ``flwr new`` project directory (``pyproject.toml`` names the
apps in ``[tool.flwr.app.components]``, run config defaults in ``[tool.flwr.app.config]``)
or ``"package.module:attribute"`` with an optional ``app_dir``; that directory goes first
on ``sys.path``, so no PYTHONPATH is needed.

Message conventions (those of Flower's own ``FedAvg`` strategy and app templates):

train (``message_type="train"``)
    sent:  ``RecordDict({"arrays": ArrayRecord(params), "config": ConfigRecord(config)})``
    reply: ``"arrays"`` ArrayRecord with the same names and shapes, ``"metrics"``
    MetricRecord with ``"num-examples"`` (int) and any other scalar metrics
    (``"train_loss"`` is passed on when present).
evaluate (``message_type="evaluate"``)
    sent:  as for train.
    reply: ``"metrics"`` MetricRecord with ``"num-examples"``, the loss under ``"loss"``
    or ``"eval_loss"``, accuracy under ``"accuracy"`` or ``"eval_acc"`` (reported as
    ``"accuracy"``); other scalar metrics are passed on.
initial parameters (version 0, ``fedraft-client init-model``), the first of: (1) an
    ``initial_parameters`` callable given to the trainer; (2) an
    ``@app.query("initial_parameters")`` handler replying with an ``"arrays"``
    ArrayRecord; (3) the project's ServerApp, whose ``@app.main()`` runs with the run
    config until it calls ``strategy.start(initial_arrays=...)`` on a flwr strategy (or
    a hand-written loop sends its first ArrayRecord): those arrays are kept and the main
    is stopped there, nothing trained (its stdout goes to stderr). Else ``FlowerAppError``.

``context.run_config`` (``run_config_for``): the project's defaults (flattened with ``"."``
as Flower does), the ``run_config`` argument, then per call the round's settings under
Flower's usual names (``RUN_CONFIG_FROM_TASK``: ``local_epochs`` -> ``"local-epochs"``,
``lr`` -> ``"learning-rate"`` and ``"lr"``, ``batch_size`` -> ``"batch-size"``, ``round``
-> ``"server-round"``), last a ``run_config`` mapping in the round's config if one is sent.
So the operator's settings reach the app (and may change between rounds).

The message's ``ConfigRecord`` is the round's config less ``run_config``, plus
``"server-round"`` (as Flower's strategies add): numpy scalars become Python ones, ``None``
is left out, nested mappings are flattened with ``"."``; anything else is a ``TypeError``.

Pinned to flwr 1.41.0 (see pyproject). What depends on Flower internals (``Message``
with explicit ``Metadata``, not the constructor reading the process-global
``TaskIdentity``; calling ``ClientApp.__call__``; peeking at registered handlers;
telemetry off after import; stopping a ServerApp at ``Strategy.start``) is in "the
fragile part" below; re-check it on any upgrade.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# flwr's names come through flower_app, which switches flwr's telemetry off first
from client.training.flower_app import (
    DEFAULT_TTL,
    FLWR_PINNED,
    INITIAL_PARAMETERS_ACTION,
    SERVER_NODE_ID,
    Array,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    FlowerApp,
    FlowerAppError,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
    flatten,
    flwr,
    import_attr,
    resolve_app,
)
from client.training.protocols import EvalResult, FitResult, Parameters

RUN_CONFIG_FROM_TASK: dict[str, tuple[str, ...]] = {
    "local_epochs": ("local-epochs",),
    "lr": ("learning-rate", "lr"),
    "batch_size": ("batch-size",),
    "round": ("server-round",),
}
"""The round's training settings (``TaskConfig.training``) under the ``run_config`` names
Flower apps read; the one place this mapping lives."""


def run_config_for(base: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``context.run_config`` for one call: ``base``, the round's settings renamed by
    ``RUN_CONFIG_FROM_TASK``, then the round's own ``run_config`` mapping if any."""
    merged = dict(base)
    for source, names in RUN_CONFIG_FROM_TASK.items():
        if config.get(source) is not None:
            merged.update(dict.fromkeys(names, _config_value(source, config[source])))
    extra = config.get("run_config")
    if isinstance(extra, Mapping):
        merged.update({k: _config_value(k, v) for k, v in flatten(extra).items()})
    return merged


# --- the fragile part: everything that depends on flwr 1.41.0 internals ---------------


def _invoke_client_app(app: ClientApp, context: Context, content: RecordDict, message_type: str,
                       group_id: str = "") -> Message:
    """Deliver one instruction message to ``app`` in-process and return its reply.

    As flwr 1.41.0's ``flwr-clientapp`` process does after pulling a message
    (``supernode/runtime/run_clientapp.py``), minus the process, network and FAB install.
    Explicit ``Metadata``: ``Message(content, dst_node_id, message_type)`` reads the ids
    from the process-global ``TaskIdentity`` that only ``flwr-clientapp`` sets. A random
    ``message_id`` stands in for the SuperLink's content hash (nothing here checks it).
    """
    metadata = Metadata(run_id=context.run_id, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE_ID,
                        dst_node_id=context.node_id, reply_to_message_id="", group_id=group_id,
                        created_at=time.time(), ttl=float(DEFAULT_TTL), message_type=message_type)
    message = Message(content=content, metadata=metadata)
    try:
        reply = app(message, context)
    except Exception as exc:
        raise FlowerAppError(
            f"ClientApp raised {type(exc).__name__} on a {message_type!r} message: {exc}") from exc
    if not isinstance(reply, Message):
        raise FlowerAppError(f"ClientApp returned {type(reply).__name__} for a {message_type!r} "
                             "message, expected a flwr Message")
    if reply.has_error():
        err = reply.error
        raise FlowerAppError(f"ClientApp replied with error code {err.code} to a {message_type!r} "
                             f"message: {err.reason}")
    if not reply.has_content():
        raise FlowerAppError(f"ClientApp reply to a {message_type!r} message has no content")
    return reply


def _app_handles(app: ClientApp, message_type: str) -> bool:
    """Whether ``app`` registered a handler for ``"category.action"`` (1.41.0 internal:
    ``ClientApp._registered_funcs``). Unknown internals answer False."""
    registered = getattr(app, "_registered_funcs", None)
    return isinstance(registered, dict) and message_type in registered


# --- conversions ----------------------------------------------------------------------


def _to_array_record(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in params.items():
        record[name] = Array(np.ascontiguousarray(value, dtype=np.float32))
    return record


def _config_value(key: str, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, list | tuple):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        kinds = {type(v) for v in items}
        if len(kinds) <= 1 and all(isinstance(v, bool | int | float | str | bytes) for v in items):
            return items
    raise TypeError(f"config[{key!r}] = {value!r} cannot travel in a Flower ConfigRecord "
                    "(allowed: bool, int, float, str, bytes, or a list of one of them)")


def _to_config_record(config: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({k: _config_value(k, v) for k, v in flatten(config).items() if v is not None})


def _record(reply: Message, name: str, kind: type, what: str) -> Any:
    content = reply.content
    if name not in content:
        raise FlowerAppError(f"ClientApp reply to {what} lacks the {name!r} {kind.__name__} "
                             f"(reply holds: {sorted(content.keys()) or 'nothing'})")
    record = content[name]
    if not isinstance(record, kind):
        raise FlowerAppError(f"ClientApp reply to {what}: {name!r} is a {type(record).__name__}, "
                             f"expected {kind.__name__}")
    return record


def _read_arrays(reply: Message, what: str, expected: Mapping[str, np.ndarray] | None) -> Parameters:
    return _decode_arrays(_record(reply, "arrays", ArrayRecord, what), f"ClientApp reply to {what}", expected)


def _decode_arrays(record: ArrayRecord, what: str, expected: Mapping[str, np.ndarray] | None) -> Parameters:
    if expected is not None:
        missing = [k for k in expected if k not in record]
        extra = [k for k in record if k not in expected]
        if missing or extra:
            raise FlowerAppError(f"{what}: array names differ from those sent "
                                 f"(missing {missing}, unexpected {extra})")
    out: Parameters = {}
    for name in list(expected) if expected is not None else list(record.keys()):
        try:
            value = record[name].numpy()
        except Exception as exc:
            raise FlowerAppError(f"{what}: array {name!r} cannot be decoded: {exc}") from exc
        if value.dtype.kind not in "fiu":
            raise FlowerAppError(f"{what}: array {name!r} has dtype {value.dtype}, expected a number type")
        if expected is not None and tuple(value.shape) != tuple(np.shape(expected[name])):
            raise FlowerAppError(f"{what}: array {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(np.shape(expected[name]))}")
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _read_metrics(reply: Message, what: str) -> tuple[int, dict[str, float]]:
    record: MetricRecord = _record(reply, "metrics", MetricRecord, what)
    if "num-examples" not in record:
        raise FlowerAppError(f"ClientApp reply to {what}: 'metrics' lacks 'num-examples' "
                             f"(has: {sorted(record.keys())})")
    raw_n = record["num-examples"]
    if (isinstance(raw_n, bool) or not isinstance(raw_n, int | float)
            or not float(raw_n).is_integer() or raw_n < 0):
        raise FlowerAppError(f"ClientApp reply to {what}: 'num-examples' must be a non-negative "
                             f"integer, got {raw_n!r}")
    metrics = {k: float(v) for k, v in record.items() if k != "num-examples" and isinstance(v, int | float)}
    return int(raw_n), metrics


def _default_node_id(node_config: Mapping[str, Any]) -> int:
    """A node id distinct from the server's, derived from the partition when there is one."""
    partition = node_config.get("partition-id", 0)
    return 2 + (partition if isinstance(partition, int) and partition >= 0 else 0)


# --- the trainer ----------------------------------------------------------------------


class FlowerAppTrainer:
    """A ``LocalTrainer`` backed by a Flower ``ClientApp`` living in this process.

    ``app_ref`` is a ``flwr new`` project directory, ``"package.module:attribute"``
    (imported with ``app_dir`` first on sys.path), a resolved ``FlowerApp`` or the
    ``ClientApp`` object itself. ``run_config`` is laid over the project's defaults;
    ``node_config`` normally carries ``"partition-id"`` and ``"num-partitions"``. The
    app and one ``Context`` are kept for the trainer's lifetime, so ``context.state``
    persists across rounds as it does under a Flower SuperNode. Calls are serialised
    by a lock. ``seed`` seeds the RNGs before a ServerApp builds the initial arrays.
    """

    def __init__(self, app_ref: str | FlowerApp | ClientApp, run_config: Mapping[str, Any] | None = None,
                 node_config: Mapping[str, Any] | None = None, *, app_dir: str | Path | None = None,
                 initial_parameters: Callable[[], Parameters] | None = None, seed: int | None = None,
                 run_id: int = 0, node_id: int = 0) -> None:
        if flwr.__version__ != FLWR_PINNED:
            raise FlowerAppError(f"fedraft hosts ClientApps with flwr {FLWR_PINNED}; "
                                 f"found {flwr.__version__}")
        self.project: FlowerApp | None = None
        if isinstance(app_ref, ClientApp):
            self.app_ref = f"<{type(app_ref).__name__} object>"
            self.app = app_ref
        else:
            self.project = app_ref if isinstance(app_ref, FlowerApp) else resolve_app(app_ref, app_dir)
            self.app_ref = app_ref if isinstance(app_ref, str) else self.project.clientapp
            self.app = import_attr(self.project.clientapp, self.project.app_dir, ClientApp)
        self._initial_fn = initial_parameters
        self._seed = seed
        defaults = self.project.run_config if self.project is not None else {}
        self.base_run_config: dict[str, Any] = {**defaults, **(run_config or {})}
        """``context.run_config`` before a round's settings are laid over it."""
        node_id = int(node_id) or _default_node_id(node_config or {})
        self.context = Context(run_id=int(run_id), node_id=node_id, node_config=dict(node_config or {}),
                               state=RecordDict(), run_config=dict(self.base_run_config))
        self._initial: Parameters | None = None
        self._lock = threading.Lock()
        self.calls = 0
        """How many messages the app has been sent (for monitoring and tests)."""

    def _send(self, content: RecordDict, message_type: str, group_id: str = "",
              config: Mapping[str, Any] | None = None) -> Message:
        with self._lock:
            self.calls += 1
            if config is not None:
                self.context.run_config = run_config_for(self.base_run_config, config)
            return _invoke_client_app(self.app, self.context, content, message_type, group_id)

    def initial_parameters(self) -> Parameters:
        if self._initial is None:
            self._initial = self._ask_initial_parameters()
        return {k: v.copy() for k, v in self._initial.items()}

    def _ask_initial_parameters(self) -> Parameters:
        if self._initial_fn is not None:
            params = self._initial_fn()
            if not isinstance(params, Mapping) or not params:
                raise FlowerAppError("initial_parameters() must return a non-empty dict of arrays, "
                                     f"got {type(params).__name__}")
            return {str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
        query = f"{MessageType.QUERY}.{INITIAL_PARAMETERS_ACTION}"
        if _app_handles(self.app, query):
            reply = self._send(RecordDict({"config": ConfigRecord()}), query)
            return _read_arrays(reply, f"a {query!r} message", expected=None)
        if self.project is not None and self.project.serverapp:
            server = self.project.serverapp
            from client.training.flower_genesis import server_app_initial_arrays

            record = server_app_initial_arrays(server, self.project.app_dir, self.base_run_config,
                                                  self._seed)
            params = _decode_arrays(record, f"the initial arrays of ServerApp {server!r}", expected=None)
            if not params:
                raise FlowerAppError(f"ServerApp {server!r} started from an empty ArrayRecord")
            return params
        raise FlowerAppError(
            f"ClientApp {self.app_ref} offers no initial parameters: give its `flwr new` project "
            "directory (a pyproject.toml naming a serverapp) so the ServerApp's initial arrays are "
            f"used, or register @app.query({INITIAL_PARAMETERS_ACTION!r}) in the ClientApp")

    def _content(self, params: Parameters, config: Mapping[str, Any]) -> RecordDict:
        if not params:
            raise ValueError("no parameters to send to the ClientApp")
        sent = {k: v for k, v in config.items() if k != "run_config"}
        if config.get("round") is not None:
            sent["server-round"] = config["round"]  # Flower's strategies add it to every config
        return RecordDict({"arrays": _to_array_record(params), "config": _to_config_record(sent)})

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        group = str(config.get("round", ""))
        reply = self._send(self._content(params, config), MessageType.TRAIN, group, config)
        new_params = _read_arrays(reply, "a train message", expected=params)
        num_examples, metrics = _read_metrics(reply, "a train message")
        return FitResult(params=new_params, num_examples=num_examples, metrics=metrics)

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        group = str(config.get("round", ""))
        reply = self._send(self._content(params, config), MessageType.EVALUATE, group, config)
        num_examples, metrics = _read_metrics(reply, "an evaluate message")
        loss = metrics.pop("loss", None)
        if loss is None:
            loss = metrics.pop("eval_loss", None)
        if loss is None:
            raise FlowerAppError("ClientApp reply to an evaluate message: 'metrics' has neither "
                                 "'loss' nor 'eval_loss'")
        if "accuracy" not in metrics and "eval_acc" in metrics:
            metrics["accuracy"] = metrics.pop("eval_acc")
        return EvalResult(loss=float(loss), num_examples=num_examples, metrics=metrics)
