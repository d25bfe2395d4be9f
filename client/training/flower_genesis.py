"""Version 0 from a Flower app's own ServerApp: run its ``main`` until it hands its initial
arrays over, and keep them (nothing trains).

A `flwr new` app builds its first model in the ServerApp (``strategy.start(initial_arrays=
...)``), not in the ClientApp, so the agent runs that ``main`` against a stand-in Grid with
``Strategy.start`` patched to stop at the arrays; a hand-written loop that sends arrays
through the Grid stops at its first push. Everything here depends on flwr 1.41.0's
internals (``TaskIdentity``, ``Grid``, ``Run``), like ``flower_host``'s pinned parts.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# flwr's names through flower_app, which switches flwr's telemetry off before importing it
from client.training.flower_app import (
    DEFAULT_TTL,
    INITIAL_PARAMETERS_ACTION,
    SERVER_NODE_ID,
    ArrayRecord,
    Context,
    FlowerAppError,
    Message,
    Metadata,
    RecordDict,
    import_attr,
    one_line,
)


class _ArraysFound(BaseException):
    """Stops a ServerApp at its initial arrays; no app's ``except Exception`` catches it."""


_GENESIS_LOCK = threading.Lock()  # Strategy.start is patched process-wide while one runs


def _first_arrays(messages: Iterable[Message]) -> ArrayRecord:
    for message in messages:
        for record in message.content.values() if message.has_content() else ():
            if isinstance(record, ArrayRecord):
                return record
    raise FlowerAppError("the ServerApp sent messages without an ArrayRecord before any initial "
                         "arrays; have it call strategy.start(initial_arrays=...) first")


@contextlib.contextmanager
def _task_identity() -> Iterator[None]:
    """Let ``Message(content, dst_node_id, message_type)`` work outside a flwr process
    (1.41.0 reads the process-global ``TaskIdentity``); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    for name, value in (("_run_id", 0), ("_node_id", SERVER_NODE_ID), ("_task_id", 0)):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _stub_grid() -> Any:
    """A ``Grid`` standing in for the SuperLink: 1000 nodes online (sampling never waits),
    and the first arrays pushed stop the ServerApp (loops that skip ``Strategy.start``)."""
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run

    class StubGrid(Grid):
        _run = Run.create_empty(0)

        def set_run(self, run: Run) -> None:
            self._run = run

        @property
        def run(self) -> Run:
            return self._run

        def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                           group_id: str, ttl: float | None = None) -> Message:
            metadata = Metadata(run_id=0, message_id="", src_node_id=SERVER_NODE_ID,
                                dst_node_id=dst_node_id, reply_to_message_id="", group_id=group_id,
                                created_at=time.time(), ttl=float(ttl or DEFAULT_TTL),
                                message_type=message_type)
            return Message(content=content, metadata=metadata)

        def get_node_ids(self) -> Iterable[int]:
            return range(2, 1002)

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            raise _ArraysFound(_first_arrays(messages))

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            return []

        def send_and_receive(self, messages: Iterable[Message], *,
                             timeout: float | None = None) -> Iterable[Message]:
            raise _ArraysFound(_first_arrays(messages))

    return StubGrid()


def _seed_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")  # imported by the app if it uses it; never imported here
    if torch is not None:
        torch.manual_seed(seed)


def server_app_initial_arrays(ref: str, app_dir: Path | None, run_config: Mapping[str, Any],
                                 seed: int | None) -> ArrayRecord:
    """Run the ServerApp ``ref`` until it hands its initial arrays to ``Strategy.start``
    (patched for the duration) or sends them through the Grid, and return them."""
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Strategy

    server_app = import_attr(ref, app_dir, ServerApp)

    def start(self: Any, grid: Any, initial_arrays: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(initial_arrays, ArrayRecord):
            raise FlowerAppError(f"ServerApp {ref!r} called strategy.start with initial_arrays of "
                                 f"type {type(initial_arrays).__name__}; pass an ArrayRecord")
        raise _ArraysFound(initial_arrays)

    context = Context(run_id=0, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    with _GENESIS_LOCK, _task_identity(), contextlib.redirect_stdout(sys.stderr):
        original = Strategy.__dict__["start"]
        Strategy.start = start  # type: ignore[method-assign]
        try:
            if seed is not None:
                _seed_rngs(seed)
            server_app(_stub_grid(), context)
        except _ArraysFound as found:
            return found.args[0]
        except FlowerAppError:
            raise
        except Exception as exc:
            raise FlowerAppError(f"ServerApp {ref!r} raised {type(exc).__name__} before handing over "
                                 f"its initial arrays: {one_line(exc)}") from exc
        finally:
            Strategy.start = original  # type: ignore[method-assign]
    raise FlowerAppError(f"ServerApp {ref!r} returned without calling strategy.start(initial_arrays="
                         "...) or sending arrays; build the initial ArrayRecord there, or register "
                         f"@app.query({INITIAL_PARAMETERS_ACTION!r}) in the ClientApp")
