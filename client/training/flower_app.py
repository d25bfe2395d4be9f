"""Loading a Flower app: a `flwr new` project directory or a module:attribute reference.

Every other Flower module of the agent imports flwr's names from here, because flwr reads
its telemetry switch once, when it is first imported: this module sets the switch before
that import (see ``flower_host`` for the message conventions and the pinned internals).
"""

from __future__ import annotations

import importlib
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

FLWR_PINNED = "1.41.0"
SERVER_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID in 1.41.0
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


# --- where the app comes from: a `flwr new` project directory or module:attribute ------


@dataclass(frozen=True)
class FlowerApp:
    """A resolved app: what to import, the directory to import it from, and the project's
    ``[tool.flwr.app.config]`` defaults (flattened)."""

    clientapp: str
    serverapp: str | None = None
    app_dir: Path | None = None
    run_config: Mapping[str, Any] = field(default_factory=dict)


def one_line(exc: BaseException) -> str:
    """An exception as one line of text, for an error message."""
    return " ".join(str(exc).split()) or type(exc).__name__


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys, as Flower flattens run config."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, full))
        else:
            flat[full] = value
    return flat


def _project(directory: Path, clientapp: str | None) -> FlowerApp:
    """The app of ``directory``, read from its ``pyproject.toml`` when it has one."""
    path = directory / "pyproject.toml"
    app: Any = {}
    if path.is_file():
        try:
            app = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise FlowerAppError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise FlowerAppError(f"{path} is not valid TOML ({one_line(exc)}); fix the file") from None
    for key in ("tool", "flwr", "app"):  # [tool.flwr.app]
        app = app.get(key, {}) if isinstance(app, dict) else {}
    components = app.get("components", {}) if isinstance(app, dict) else {}
    components = components if isinstance(components, dict) else {}
    clientapp = clientapp or components.get("clientapp")
    if not isinstance(clientapp, str) or not clientapp:
        raise FlowerAppError(f"{path} names no ClientApp; add [tool.flwr.app.components] "
                             'clientapp = "package.client_app:app"')
    serverapp = components.get("serverapp")
    config = app.get("config", {}) if isinstance(app, dict) else {}
    return FlowerApp(clientapp, serverapp if isinstance(serverapp, str) and serverapp else None,
                     directory.resolve(), flatten(config if isinstance(config, dict) else {}))


def resolve_app(ref: str, app_dir: str | Path | None = None) -> FlowerApp:
    """Turn ``--flower-app`` (and ``--app-dir``) into a ``FlowerApp``: a directory is read
    as a ``flwr new`` project, anything else must be ``package.module:attribute``."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if app_dir is not None:
            raise FlowerAppError(f"{ref} is a project directory already; drop --app-dir (it goes "
                                 "with a 'package.module:attribute' reference)")
        if not (path / "pyproject.toml").is_file():
            raise FlowerAppError(f"{ref} has no pyproject.toml; give the project directory `flwr new` "
                                 "made, or 'package.module:attribute' with --app-dir")
        return _project(path, None)
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FlowerAppError(f"app reference {ref!r} must look like 'package.module:attribute' "
                             "or be a Flower app project directory (one with pyproject.toml)")
    if app_dir is None:
        return FlowerApp(ref)
    directory = Path(app_dir).expanduser()
    if not directory.is_dir():
        raise FlowerAppError(f"app directory {app_dir} does not exist; give the directory that "
                             f"holds package {module_name.split('.')[0]!r}")
    return _project(directory, ref)


def import_attr(ref: str, app_dir: Path | None, kind: type) -> Any:
    """Import ``module:attribute`` (attribute may be dotted), ``app_dir`` first on sys.path."""
    module_name, sep, attr_path = ref.partition(":")
    if not sep or not module_name or not attr_path:
        raise FlowerAppError(f"app reference {ref!r} must look like 'package.module:attribute'")
    if app_dir is not None and str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f"from {app_dir}" if app_dir is not None else "(not on sys.path)"
        hint = "" if app_dir is not None else ("; give the app's project directory as --flower-app, "
                                               "or --app-dir DIR holding the package")
        raise FlowerAppError(f"cannot import module {module_name!r} of {ref!r} {where}: "
                             f"{one_line(exc)}{hint}") from exc
    except Exception as exc:  # the app's own module failed while importing
        raise FlowerAppError(f"cannot import module {module_name!r} of {ref!r}: it raised "
                             f"{type(exc).__name__}: {one_line(exc)}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FlowerAppError(f"{ref!r}: no attribute {part!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, kind):
        raise FlowerAppError(f"{ref!r} is a {type(obj).__name__}, not a flwr {kind.__name__}")
    return obj


def load_client_app(app_ref: str, app_dir: str | Path | None = None) -> ClientApp:
    """The ClientApp that ``app_ref`` (a project directory or module:attribute) names."""
    app = resolve_app(app_ref, app_dir)
    return import_attr(app.clientapp, app.app_dir, ClientApp)


__all__ = [
    "DEFAULT_TTL", "FLWR_PINNED", "INITIAL_PARAMETERS_ACTION", "SERVER_NODE_ID", "Array", "ArrayRecord",
    "ClientApp", "ConfigRecord", "Context", "FlowerApp", "FlowerAppError", "Message",
    "MessageType", "Metadata", "MetricRecord", "RecordDict", "flatten", "flwr", "import_attr",
    "load_client_app", "one_line", "resolve_app",
]
