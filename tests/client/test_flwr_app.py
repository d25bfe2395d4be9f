"""A Flower app as `flwr new` lays it out, hosted by the agent with no edits and no PYTHONPATH.

The example project (client/examples/flwr_app) is loaded from its directory; an echo app
written here reports what its Context held, so the tests can see node_config and
run_config as the app saw them; the end-to-end test runs it under a real cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.cli import _trainer_from_config
from client.config import SiteConfigError, load_site_config
from client.enroll import BundleError, import_bundle
from client.training.flower_app import resolve_app
from client.training.flower_host import (
    RUN_CONFIG_FROM_TASK,
    FlowerAppError,
    FlowerAppTrainer,
    run_config_for,
)
from coordinator import wire

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "client" / "examples" / "flwr_app"
AGENT = Path(sys.executable).parent / "fedraft-client"
DEFAULTS = {"num-server-rounds": 3, "fraction-train": 1.0, "local-epochs": 2, "learning-rate": 0.05,
            "batch-size": 16}

ECHO_PYPROJECT = """\
[project]
name = "echoapp"
version = "1.0.0"

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "fedraft_echo_app.server_app:app"
clientapp = "fedraft_echo_app.client_app:app"

[tool.flwr.app.config]
local-epochs = 5
learning-rate = 0.5
batch-size = 8
greeting = "hello"
model.width = 4
"""

ECHO_CLIENT = '''\
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
seen = []


def _echo(msg: Message, context: Context) -> MetricRecord:
    seen.append((dict(context.run_config), dict(context.node_config), dict(msg.content["config"])))
    numbers = {k: v for k, v in {**context.run_config, **context.node_config}.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return MetricRecord({**numbers, "num-examples": 1})


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": _echo(msg, context)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = _echo(msg, context)
    metrics["loss"] = 0.5
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
'''

# a hand-written server loop (no Strategy.start): its first message's arrays are version 0
ECHO_SERVER = '''\
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    print("this goes to stderr, not into init-model's output")
    arrays = ArrayRecord()
    arrays["w"] = Array(np.full((2, 3), float(context.run_config["model.width"]), np.float32))
    nodes = list(grid.get_node_ids())[:2]
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=n,
                        message_type=MessageType.TRAIN) for n in nodes]
    grid.send_and_receive(messages)
    raise RuntimeError("never reached: the first arrays sent stop the app")
'''


def _write_project(root: Path, server: str = ECHO_SERVER) -> Path:
    package = root / "fedraft_echo_app"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(ECHO_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "client_app.py").write_text(ECHO_CLIENT)
    (package / "server_app.py").write_text(server)
    return root


@pytest.fixture(scope="module")
def echo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_project(tmp_path_factory.mktemp("echo"))


def _clean_env() -> dict[str, str]:
    """The agent's environment without PYTHONPATH: nothing but the app's directory helps."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# --- the example is a `flwr new` project ------------------------------------------


def test_example_is_a_valid_flower_project() -> None:
    from flwr.common.config import validate_config

    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=False)
    assert valid, errors
    app = resolve_app(str(EXAMPLE))
    assert (app.clientapp, app.serverapp) == ("cancerapp.client_app:app", "cancerapp.server_app:app")
    assert app.app_dir == EXAMPLE and dict(app.run_config) == DEFAULTS


def test_loads_by_directory_with_no_pythonpath(tmp_path: Path) -> None:
    """A fresh process, started elsewhere, with no PYTHONPATH: the directory is enough."""
    out = tmp_path / "genesis.safetensors"
    done = subprocess.run([str(AGENT), "init-model", "--flower-app", str(EXAMPLE), "-o", str(out),
                           "--json"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hash"] == wire.sha256_hex(out.read_bytes())
    params = wire.decode_model(out.read_bytes())
    sys.path.insert(0, str(EXAMPLE))  # to build the app's own model here
    try:
        from cancerapp.task import Net
    finally:
        sys.path.remove(str(EXAMPLE))
    shapes = {k: tuple(v.shape) for k, v in Net().state_dict().items()}
    assert {k: v.shape for k, v in params.items()} == shapes

    # the module reference alone does not import there: one line naming the fix, exit 2
    bare = subprocess.run([str(AGENT), "init-model", "--flower-app", "cancerapp.client_app:app",
                           "-o", str(tmp_path / "x")], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1
    assert "No module named 'cancerapp'" in bare.stderr and "--app-dir" in bare.stderr
    with_dir = subprocess.run([str(AGENT), "init-model", "--flower-app", "cancerapp.client_app:app",
                               "--app-dir", str(EXAMPLE), "-o", str(tmp_path / "y")], cwd=tmp_path,
                              env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert with_dir.returncode == 0, with_dir.stderr
    assert (tmp_path / "y").read_bytes() == out.read_bytes()  # the same app, --seed 0 both times


def test_example_trains_on_its_own_partition_with_the_run_settings() -> None:
    sites = [FlowerAppTrainer(str(EXAMPLE), node_config={"partition-id": i, "num-partitions": 3},
                              seed=0) for i in range(3)]
    params = sites[0].initial_parameters()
    sizes = []
    for rnd in (1, 2):
        results = [s.fit(params, {"local_epochs": 1, "lr": 0.1, "batch_size": 32, "round": rnd})
                   for s in sites]
        sizes = [r.num_examples for r in results]
        total = sum(sizes)
        params = {k: sum(r.params[k] * r.num_examples for r in results) / total for k in params}
    assert sum(sizes) == int(0.8 * 190) * 2 + int(0.8 * 189)  # 569 rows in three shards, 80% train
    assert sites[2].context.run_config["local-epochs"] == 1
    assert sites[2].context.run_config["learning-rate"] == 0.1
    evals = [s.evaluate(params, {"round": 2}) for s in sites]
    assert sum(e.num_examples for e in evals) == 569 - sum(sizes)
    assert min(e.metrics["accuracy"] for e in evals) > 0.85


# --- node_config from `import`, run_config from the project and the round -----------


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, Path]:
    from coordinator.cluster import pki
    from coordinator.ops import enroll as op_bundle

    pki.init_ca(tmp_path / "ca")
    key = Ed25519PrivateKey.generate()
    identity = tmp_path / "identity.pem"
    identity.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    made = op_bundle.build_bundle(tmp_path / "ca", "site-b", wire.public_key_hex(key),
                                  ["127.0.0.1:7200"], 3.0, 1e-5)
    path = tmp_path / "bundle.json"
    op_bundle.write_bundle(path, made)
    return path, identity


def test_import_flags_become_node_config(bundle: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # a relative project directory, as a user types it
    done = import_bundle(*bundle, tmp_path / "site", flower_app="client/examples/flwr_app",
                         partition=2, num_partitions=3)
    cfg = load_site_config(done.config_path)
    assert cfg.flower_app == str(EXAMPLE) and cfg.app_dir is None  # stored absolute
    assert (cfg.data["partition"], cfg.data["num_partitions"]) == (2, 3)
    trainer = _trainer_from_config(cfg)
    assert isinstance(trainer, FlowerAppTrainer)
    assert trainer.context.node_config == {"partition-id": 2, "num-partitions": 3}
    assert trainer.context.run_config == DEFAULTS

    again = import_bundle(*bundle, tmp_path / "site2", flower_app="cancerapp.client_app:app",
                          app_dir="client/examples/flwr_app", partition=1, num_partitions=3)
    cfg = load_site_config(again.config_path)
    assert cfg.app_dir == EXAMPLE and cfg.flower_app == "cancerapp.client_app:app"
    assert _trainer_from_config(cfg).context.node_config == {"partition-id": 1, "num-partitions": 3}


def test_import_refuses_what_the_agent_could_not_load(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    cases = [({"flower_app": str(tmp_path)}, "has no pyproject.toml"),
             ({"flower_app": "nope_pkg.client_app:app", "app_dir": str(tmp_path)}, "No module named"),
             ({"task": "breast_cancer", "app_dir": str(EXAMPLE)}, "--app-dir goes with --flower-app")]
    for kwargs, why in cases:
        with pytest.raises(BundleError, match=why):
            import_bundle(*bundle, tmp_path / "site", **kwargs)
        assert not (tmp_path / "site").exists()


def test_run_config_defaults_then_round_settings_reach_the_app(echo_project: Path) -> None:
    trainer = FlowerAppTrainer(str(echo_project), node_config={"partition-id": 1, "num-partitions": 4})
    from fedraft_echo_app import client_app

    flat_defaults = {"local-epochs": 5, "learning-rate": 0.5, "batch-size": 8, "greeting": "hello",
                     "model.width": 4}
    assert trainer.context.run_config == flat_defaults
    params = {"w": np.ones((2, 3), np.float32)}
    result = trainer.fit(params, {"local_epochs": 2, "lr": 0.01, "batch_size": 64, "round": 3,
                                  "run_config": {"model": {"width": 7}}})
    assert result.metrics == {"local-epochs": 2, "learning-rate": 0.01, "lr": 0.01, "batch-size": 64,
                              "server-round": 3, "model.width": 7, "partition-id": 1,
                              "num-partitions": 4}
    run_config, node_config, message_config = client_app.seen[-1]
    assert run_config["greeting"] == "hello"  # defaults the round does not set stay
    assert message_config == {"local_epochs": 2, "lr": 0.01, "batch_size": 64, "round": 3,
                              "server-round": 3}
    ev = trainer.evaluate(params, {"local_epochs": 1, "lr": 0.2, "batch_size": 4, "round": 4})
    assert (ev.metrics["local-epochs"], ev.metrics["learning-rate"], ev.metrics["model.width"]) == (1, 0.2, 4)


def test_the_mapping_lives_in_one_place() -> None:
    assert run_config_for({"a": 1}, {"local_epochs": 3, "lr": 0.1, "batch_size": 32, "round": 2}) == {
        "a": 1, "local-epochs": 3, "learning-rate": 0.1, "lr": 0.1, "batch-size": 32, "server-round": 2}
    assert set(RUN_CONFIG_FROM_TASK) == {"local_epochs", "lr", "batch_size", "round"}
    # a run_config the federation may send one day is laid over everything, flattened
    assert run_config_for({"local-epochs": 1}, {"local_epochs": 2, "run_config": {"local-epochs": 9}}) == {
        "local-epochs": 9}


# --- version 0 from the app's own ServerApp -------------------------------------------


def test_genesis_from_a_hand_written_server_loop(echo_project: Path) -> None:
    from flwr.serverapp.strategy import Strategy
    from flwr.supercore.task_identity import TaskIdentity

    start = Strategy.__dict__["start"]
    params = FlowerAppTrainer(str(echo_project)).initial_parameters()
    assert list(params) == ["w"] and np.array_equal(params["w"], np.full((2, 3), 4.0, np.float32))
    assert Strategy.__dict__["start"] is start and TaskIdentity._run_id is None  # all put back


@pytest.mark.parametrize(("server", "pattern"), [
    ("from flwr.serverapp import ServerApp\napp = ServerApp()\n\n@app.main()\n"
     "def main(grid, context):\n    return None\n", "returned without calling strategy.start"),
    ("from flwr.serverapp import ServerApp\napp = ServerApp()\n\n@app.main()\n"
     "def main(grid, context):\n    raise KeyError('num-server-rounds')\n",
     "raised KeyError before handing over its initial arrays"),
    ("app = 3\n", "is a int, not a flwr ServerApp"),
])
def test_genesis_failures_are_one_clear_line(tmp_path: Path, server: str, pattern: str) -> None:
    project = _write_project(tmp_path / "p", server=server)
    (project / "pyproject.toml").write_text(ECHO_PYPROJECT.replace("fedraft_echo_app", "fedraft_bad_app"))
    (project / "fedraft_echo_app").rename(project / "fedraft_bad_app")
    for name in [m for m in sys.modules if m.startswith("fedraft_bad_app")]:
        del sys.modules[name]  # each case brings its own server_app
    with pytest.raises(FlowerAppError, match=pattern) as info:
        FlowerAppTrainer(str(project)).initial_parameters()
    assert "\n" not in str(info.value)


def test_bad_projects_are_named_with_their_fix(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.components]\nserverapp = 'x:app'\n")
    with pytest.raises(FlowerAppError, match="names no ClientApp; add \\[tool.flwr.app.components\\]"):
        resolve_app(str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app\n")
    with pytest.raises(FlowerAppError, match="not valid TOML"):
        resolve_app(str(tmp_path))
    with pytest.raises(FlowerAppError, match="drop --app-dir"):
        resolve_app(str(EXAMPLE), app_dir=EXAMPLE)
    with pytest.raises(FlowerAppError, match="does not exist"):
        resolve_app("cancerapp.client_app:app", app_dir=tmp_path / "missing")


def test_site_config_resolves_the_app_next_to_the_file(tmp_path: Path) -> None:
    base = ('[site]\nid = "s"\nnodes = ["127.0.0.1:7200"]\nstate_dir = "st"\nidentity_key = "k"\n'
            '[tls]\nca = "c"\ncert = "c"\nkey = "k"\n')
    path = tmp_path / "site.toml"
    path.write_text(base + '[task]\nflower_app = "apps/cancer"\n')
    assert load_site_config(path).flower_app == str(tmp_path / "apps" / "cancer")
    path.write_text(base + '[task]\nflower_app = "cancerapp.client_app:app"\napp_dir = "apps"\n')
    cfg = load_site_config(path)
    assert (cfg.flower_app, cfg.app_dir) == ("cancerapp.client_app:app", tmp_path / "apps")
    path.write_text(base + '[task]\nname = "breast_cancer"\napp_dir = "apps"\n')
    with pytest.raises(SiteConfigError, match="task.app_dir"):
        load_site_config(path)


# --- end to end: three sites host the project from its directory ------------------------


def test_three_sites_host_the_flwr_new_project(tmp_path: Path) -> None:
    from tests.coordinator.conftest import federation

    began = time.monotonic()
    sites = ["cancer-0", "cancer-1", "cancer-2"]
    with federation(tmp_path / "c", sites=sites, task="", flower_app=str(EXAMPLE)) as c:
        c.admin.call("Train", {"rounds": 2, "config": {
            "fraction": 1.0, "min_clients": 3, "lr": 0.1, "local_epochs": 2, "compression": 2.0,
            "online_wait_s": 20.0}})
        st = c.wait_round(2, timeout=90)
        versions = [v["hash"] for v in st["versions"]]
        assert versions[0] == c.genesis_version and len(set(versions)) == 3
        first, second = (st["history"][r]["committed"]["metrics"] for r in ("1", "2"))
        # the sites' evaluate replies (eval_acc) of the model each round started from
        assert second["base_accuracy"] > 0.85 and second["base_accuracy"] > first["base_accuracy"]
        assert second["train_loss"] < first["train_loss"]
        names = set(wire.decode_model(c.admin.call("GetBlob", {"hash": versions[-1]})["data"]))
        assert names == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
        for s in sites:
            assert c.site_procs[s].alive
            log = (c.root / "sites" / s / "agent.log").read_text()
            assert "flower app " + str(EXAMPLE) in log
    assert time.monotonic() - began < 90
