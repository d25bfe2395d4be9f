"""The shared noise-multiplier cache returns what the search returns, and never a value
that does not fit its plan."""

import json
import time

from client.dp.sigma_cache import planned_noise_multiplier
from privacy.accounting import DPStep, epsilon_spent, noise_multiplier_for

PLAN = (3.0, 1e-5, 0.25, 4, 5)


def test_cached_answer_equals_the_search_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAFT_CACHE_DIR", str(tmp_path))
    first = planned_noise_multiplier(*PLAN)
    assert first == noise_multiplier_for(*PLAN)
    t0 = time.perf_counter()
    again = planned_noise_multiplier(*PLAN)
    assert again == first and time.perf_counter() - t0 < 2.0
    history = [DPStep(first, 0.25, 4, 1.0)]
    assert planned_noise_multiplier(*PLAN[:4], 4, history) == noise_multiplier_for(*PLAN[:4], 4, history)


def test_an_edited_cache_cannot_shrink_the_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDRAFT_CACHE_DIR", str(tmp_path))
    honest = planned_noise_multiplier(*PLAN)
    (entry,) = (tmp_path / "noise-multipliers").glob("*.json")
    entry.write_text(json.dumps({"noise_multiplier": honest / 3}))
    assert planned_noise_multiplier(*PLAN) == honest
    step = DPStep(honest, 0.25, 4, 1.0)
    assert epsilon_spent([step] * 5, 1e-5) <= 3.0
    entry.write_text("not json")
    assert planned_noise_multiplier(*PLAN) == honest
