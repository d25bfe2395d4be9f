"""Sites that bring their own Flower ClientApp, hosted in-process by the agent."""

import re

from coordinator import wire
from privacy import accounting

APP = "client.examples.flower_breast_cancer:app"


def test_flower_clientapp_sites_train_in_long_lived_agents(make_cluster):
    sites = ["flower-0", "flower-1", "flower-2"]
    c = make_cluster(sites=sites, task="", flower_app=APP)
    genesis = c.genesis_version  # the Flower app's initial parameters, uploaded
    c.admin.call("Train", {"rounds": 3, "config": {
        "fraction": 1.0, "min_clients": 2, "lr": 0.1, "local_epochs": 2,
        "compression": 2.0, "online_wait_s": 20.0}})
    st = c.wait_round(3, timeout=120)
    versions = [v["hash"] for v in st["versions"]]
    assert versions[0] == genesis and len(set(versions)) == 4
    first = st["history"]["1"]["committed"]["metrics"]["base_accuracy"]
    last = st["history"]["3"]["committed"]["metrics"]["base_accuracy"]
    assert last > first, (first, last)
    # the Flower app's own tensor names travel unchanged
    names = set(wire.decode_model(c.admin.call("GetBlob", {"hash": versions[-1]})["data"]))
    assert names == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    # one agent process per site served every round: no process per message
    for s in sites:
        assert c.site_procs[s].alive
        log = (c.root / "sites" / s / "agent.log").read_text()
        assert len(re.findall(r"round \d+\.\d+: accepted", log)) == 3


def test_flower_sites_with_privacy_are_charged_client_level(make_cluster):
    budget = {"epsilon": 30.0, "delta": 1e-5, "planned_rounds": 3, "clip_norm": 1.0}
    sites = ["fdp-0", "fdp-1"]
    c = make_cluster(sites=sites, task="", flower_app=APP,
                     budget=(budget["epsilon"], budget["delta"]), privacy=budget)
    c.admin.call("Train", {"rounds": 2, "config": {
        "fraction": 1.0, "min_clients": 2, "lr": 0.1, "local_epochs": 1,
        "compression": 2.0, "online_wait_s": 30.0}})
    c.wait_round(2, timeout=180)
    records = {s["site"]: s for s in c.admin.all_sites(charges=True)}
    for s in sites:
        charges = records[s]["charges"]
        assert len(charges) >= 2
        # one Gaussian release of the whole update per round: no subsampling
        assert {(x["sample_rate"], x["steps"], x["clip_norm"]) for x in charges} == {(1.0, 1.0, 1.0)}
        steps = [accounting.DPStep(x["noise_multiplier"], 1.0, 1, 1.0) for x in charges]
        assert abs(accounting.epsilon_spent(steps, budget["delta"]) - records[s]["spent"]) < 1e-9
        assert records[s]["spent"] <= budget["epsilon"] + 1e-9
        log = (c.root / "sites" / s / "agent.log").read_text()
        assert "CLIENT-LEVEL" in log
