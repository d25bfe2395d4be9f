"""Host a Flower Message-API ``ClientApp`` in-process, as a ``LocalTrainer``.

Sites that already have Flower training code keep it: the agent loads their
``ClientApp`` once, keeps it (and one Flower ``Context``) for the life of the process,
and calls it directly for every round. No SuperLink, no SuperNode, no process per
message: a call is a Python function call on the arrays the agent already holds.

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
initial parameters
    Flower has no client-side convention for them (its ServerApp builds version 0).
    fedraft uses, in order: (1) the ``initial_parameters`` argument given alongside
    the app, a callable returning ``Parameters``; (2) a query handler the app
    registered as ``@app.query("initial_parameters")``: it gets a
    ``"query.initial_parameters"`` message with an empty ``"config"`` and must reply
    with an ``"arrays"`` ArrayRecord. With neither, ``initial_parameters()`` raises
    ``FlowerAppError``. The first answer is kept, so every call returns the same
    weights.

The ``config`` mapping becomes a ``ConfigRecord``: numpy scalars become Python scalars,
``None`` values are left out (Flower has no null), nested mappings are flattened with
``"."`` between keys (as Flower flattens nested run config); anything else that a
``ConfigRecord`` cannot hold raises ``TypeError``.

Pinned to flwr 1.41.0 (see pyproject). Everything that depends on Flower internals
(building a ``Message`` with explicit ``Metadata`` instead of the constructor that
reads the process-global ``TaskIdentity``, calling ``ClientApp.__call__`` directly,
peeking at registered handlers, switching telemetry off after import) is in
``_FLWR_PINNED`` and ``_invoke_client_app`` below; re-check them on any upgrade.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from client.training.protocols import EvalResult, FitResult, Parameters

# Must happen before flwr is imported anywhere in this process: flwr reads the
# telemetry switch once, at import.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

import flwr  # noqa: E402
from flwr.app import (  # noqa: E402
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402

_FLWR_PINNED = "1.41.0"
_SERVER_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID in 1.41.0
INITIAL_PARAMETERS_ACTION = "initial_parameters"


def _disable_flwr_telemetry() -> None:
    """Belt and braces: if flwr was imported before this module, telemetry read its
    switch then; turn it off in the module too (an internal name of 1.41.0)."""
    try:
        from flwr.supercore import telemetry
    except ImportError:  # pragma: no cover - layout of another flwr version
        return
    if hasattr(telemetry, "FLWR_TELEMETRY_ENABLED"):
        telemetry.FLWR_TELEMETRY_ENABLED = "0"


_disable_flwr_telemetry()


class FlowerAppError(RuntimeError):
    """The hosted ClientApp could not be loaded, failed, or broke the message contract."""


def load_client_app(app_ref: str) -> ClientApp:
    """Import ``"package.module:attribute"`` (attribute may be dotted) as a ClientApp."""
    module_name, sep, attr_path = app_ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise FlowerAppError(f"app reference {app_ref!r} must look like 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowerAppError(f"cannot import module {module_name!r} of {app_ref!r}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FlowerAppError(f"{app_ref!r}: no attribute {part!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, ClientApp):
        raise FlowerAppError(f"{app_ref!r} is a {type(obj).__name__}, not a flwr ClientApp")
    return obj


# --- the fragile part: everything that depends on flwr 1.41.0 internals ---------------


def _invoke_client_app(
    app: ClientApp,
    context: Context,
    content: RecordDict,
    message_type: str,
    group_id: str = "",
) -> Message:
    """Deliver one instruction message to ``app`` in-process and return its reply.

    Mirrors what flwr 1.41.0's ``flwr-clientapp`` process does after pulling a message
    (``supernode/runtime/run_clientapp.py``: ``client_app(message=..., context=...)``),
    minus the process, the network and the FAB install. The message is built with
    explicit ``Metadata`` because ``Message(content, dst_node_id, message_type)``
    reads the run and node ids from the process-global ``TaskIdentity``, which only a
    real ``flwr-clientapp`` process sets. ``message_id`` is normally the content's
    object id, set by the SuperLink; here a random id stands in (nothing in-process
    checks it, and hashing the content would serialise every array).
    """
    metadata = Metadata(
        run_id=context.run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=_SERVER_NODE_ID,
        dst_node_id=context.node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=float(DEFAULT_TTL),
        message_type=message_type,
    )
    message = Message(content=content, metadata=metadata)
    try:
        reply = app(message, context)
    except Exception as exc:
        raise FlowerAppError(
            f"ClientApp raised {type(exc).__name__} on a {message_type!r} message: {exc}"
        ) from exc
    if not isinstance(reply, Message):
        raise FlowerAppError(
            f"ClientApp returned {type(reply).__name__} for a {message_type!r} message, "
            "expected a flwr Message"
        )
    if reply.has_error():
        err = reply.error
        raise FlowerAppError(
            f"ClientApp replied with error code {err.code} to a {message_type!r} message: {err.reason}"
        )
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
    raise TypeError(
        f"config[{key!r}] = {value!r} cannot travel in a Flower ConfigRecord "
        "(allowed: bool, int, float, str, bytes, or a list of one of them)"
    )


def _to_config_record(config: Mapping[str, Any]) -> ConfigRecord:
    flat: dict[str, Any] = {}

    def walk(prefix: str, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            if value is None:
                continue
            if isinstance(value, Mapping):
                walk(full, value)
            else:
                flat[full] = _config_value(full, value)

    walk("", config)
    return ConfigRecord(flat)


def _record(reply: Message, name: str, kind: type, what: str) -> Any:
    content = reply.content
    if name not in content:
        raise FlowerAppError(
            f"ClientApp reply to {what} lacks the {name!r} {kind.__name__} "
            f"(reply holds: {sorted(content.keys()) or 'nothing'})"
        )
    record = content[name]
    if not isinstance(record, kind):
        raise FlowerAppError(
            f"ClientApp reply to {what}: {name!r} is a {type(record).__name__}, expected {kind.__name__}"
        )
    return record


def _read_arrays(reply: Message, what: str, expected: Mapping[str, np.ndarray] | None) -> Parameters:
    record: ArrayRecord = _record(reply, "arrays", ArrayRecord, what)
    if expected is not None:
        missing = [k for k in expected if k not in record]
        extra = [k for k in record if k not in expected]
        if missing or extra:
            raise FlowerAppError(
                f"ClientApp reply to {what}: array names differ from those sent "
                f"(missing {missing}, unexpected {extra})"
            )
        names = list(expected)
    else:
        names = list(record.keys())
    out: Parameters = {}
    for name in names:
        try:
            value = record[name].numpy()
        except Exception as exc:
            raise FlowerAppError(
                f"ClientApp reply to {what}: array {name!r} cannot be decoded: {exc}"
            ) from exc
        if value.dtype.kind not in "fiu":
            raise FlowerAppError(
                f"ClientApp reply to {what}: array {name!r} has dtype {value.dtype}, expected a number type"
            )
        if expected is not None and tuple(value.shape) != tuple(np.shape(expected[name])):
            raise FlowerAppError(
                f"ClientApp reply to {what}: array {name!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(np.shape(expected[name]))}"
            )
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _read_metrics(reply: Message, what: str) -> tuple[int, dict[str, float]]:
    record: MetricRecord = _record(reply, "metrics", MetricRecord, what)
    if "num-examples" not in record:
        raise FlowerAppError(
            f"ClientApp reply to {what}: 'metrics' lacks 'num-examples' (has: {sorted(record.keys())})"
        )
    raw_n = record["num-examples"]
    if (
        isinstance(raw_n, bool)
        or not isinstance(raw_n, int | float)
        or not float(raw_n).is_integer()
        or raw_n < 0
    ):
        raise FlowerAppError(
            f"ClientApp reply to {what}: 'num-examples' must be a non-negative integer, got {raw_n!r}"
        )
    metrics = {k: float(v) for k, v in record.items() if k != "num-examples" and isinstance(v, int | float)}
    return int(raw_n), metrics


def _default_node_id(node_config: Mapping[str, Any]) -> int:
    """A node id distinct from the server's, derived from the partition when there is one."""
    partition = node_config.get("partition-id", 0)
    return 2 + (partition if isinstance(partition, int) and partition >= 0 else 0)


# --- the trainer ----------------------------------------------------------------------


class FlowerAppTrainer:
    """A ``LocalTrainer`` backed by a Flower ``ClientApp`` living in this process.

    ``app_ref`` is ``"package.module:attribute"`` (or the ``ClientApp`` object
    itself). ``run_config`` and ``node_config`` become the ``Context`` the app sees;
    ``node_config`` normally carries ``"partition-id"`` and ``"num-partitions"``. The
    app and one ``Context`` are kept for the trainer's lifetime, so ``context.state``
    persists across rounds as it does under a Flower SuperNode. Calls are serialised
    by a lock.
    """

    def __init__(
        self,
        app_ref: str | ClientApp,
        run_config: Mapping[str, Any] | None = None,
        node_config: Mapping[str, Any] | None = None,
        *,
        initial_parameters: Callable[[], Parameters] | None = None,
        run_id: int = 0,
        node_id: int = 0,
    ) -> None:
        if flwr.__version__ != _FLWR_PINNED:
            raise FlowerAppError(
                f"fedraft hosts ClientApps with flwr {_FLWR_PINNED}; found {flwr.__version__}"
            )
        if isinstance(app_ref, ClientApp):
            self.app_ref = f"<{type(app_ref).__name__} object>"
            self.app = app_ref
        else:
            self.app_ref = app_ref
            self.app = load_client_app(app_ref)
        self._initial_fn = initial_parameters
        self.context = Context(
            run_id=int(run_id),
            node_id=int(node_id) or _default_node_id(node_config or {}),
            node_config=dict(node_config or {}),
            state=RecordDict(),
            run_config=dict(run_config or {}),
        )
        self._initial: Parameters | None = None
        self._lock = threading.Lock()
        self.calls = 0
        """How many messages the app has been sent (for monitoring and tests)."""

    def _send(self, content: RecordDict, message_type: str, group_id: str = "") -> Message:
        with self._lock:
            self.calls += 1
            return _invoke_client_app(self.app, self.context, content, message_type, group_id)

    def initial_parameters(self) -> Parameters:
        if self._initial is None:
            self._initial = self._ask_initial_parameters()
        return {k: v.copy() for k, v in self._initial.items()}

    def _ask_initial_parameters(self) -> Parameters:
        if self._initial_fn is not None:
            params = self._initial_fn()
            if not isinstance(params, Mapping) or not params:
                raise FlowerAppError(
                    "initial_parameters() must return a non-empty dict of arrays, "
                    f"got {type(params).__name__}"
                )
            return {str(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
        query = f"{MessageType.QUERY}.{INITIAL_PARAMETERS_ACTION}"
        if _app_handles(self.app, query):
            reply = self._send(RecordDict({"config": ConfigRecord()}), query)
            return _read_arrays(reply, f"a {query!r} message", expected=None)
        raise FlowerAppError(
            f"ClientApp {self.app_ref} offers no initial parameters: pass "
            "initial_parameters=<callable> to FlowerAppTrainer, or register a handler "
            f"with @app.query({INITIAL_PARAMETERS_ACTION!r}) in the app"
        )

    def _content(self, params: Parameters, config: Mapping[str, Any]) -> RecordDict:
        if not params:
            raise ValueError("no parameters to send to the ClientApp")
        return RecordDict({"arrays": _to_array_record(params), "config": _to_config_record(config)})

    def fit(self, params: Parameters, config: Mapping[str, Any]) -> FitResult:
        group = str(config.get("round", ""))
        reply = self._send(self._content(params, config), MessageType.TRAIN, group)
        new_params = _read_arrays(reply, "a train message", expected=params)
        num_examples, metrics = _read_metrics(reply, "a train message")
        return FitResult(params=new_params, num_examples=num_examples, metrics=metrics)

    def evaluate(self, params: Parameters, config: Mapping[str, Any]) -> EvalResult:
        group = str(config.get("round", ""))
        reply = self._send(self._content(params, config), MessageType.EVALUATE, group)
        num_examples, metrics = _read_metrics(reply, "an evaluate message")
        loss = metrics.pop("loss", None)
        if loss is None:
            loss = metrics.pop("eval_loss", None)
        if loss is None:
            raise FlowerAppError(
                "ClientApp reply to an evaluate message: 'metrics' has neither 'loss' nor 'eval_loss'"
            )
        if "accuracy" not in metrics and "eval_acc" in metrics:
            metrics["accuracy"] = metrics.pop("eval_acc")
        return EvalResult(loss=float(loss), num_examples=num_examples, metrics=metrics)
