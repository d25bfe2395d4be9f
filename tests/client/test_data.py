"""Offline datasets and site splits: deterministic, disjoint, covering, skewed on demand."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.training.data import (
    BREAST_CANCER_RANGES,
    DATASETS,
    global_split,
    global_test_data,
    load_dataset,
    partition,
    preprocess,
    site_data,
)


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("breast_cancer", (569, 30), 2),
        ("digits", (1797, 1, 8, 8), 10),
        ("mnist", (5000, 1, 28, 28), 10),
    ],
)
def test_load_dataset_shapes_and_types(name: str, shape: tuple, classes: int) -> None:
    x, y, num_classes = load_dataset(name)
    assert x.shape == shape and x.dtype == np.float32
    assert y.shape == (shape[0],) and y.dtype == np.int64
    assert num_classes == classes
    assert set(np.unique(y)) == set(range(classes))
    assert np.isfinite(x).all()
    if name == "mnist":
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.99
    with pytest.raises(ValueError):
        x[0] = 0  # cached arrays are read-only


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", DATASETS)
def test_global_split_deterministic_disjoint_covering_stratified(name: str) -> None:
    _, y, num_classes = load_dataset(name)
    train, test = global_split(name)
    train2, test2 = global_split(name)
    assert np.array_equal(train, train2) and np.array_equal(test, test2)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.union1d(train, test), np.arange(y.size))
    assert abs(test.size - 0.2 * y.size) <= num_classes
    # stratified: every class's share of the test side is within one record of 20 %
    for c in range(num_classes):
        n_c = int((y == c).sum())
        assert abs(int((y[test] == c).sum()) - 0.2 * n_c) <= 1
    other_train, _ = global_split(name, seed=1)
    assert not np.array_equal(train, other_train)


def _check_partition(parts: list[np.ndarray], n: int, num_sites: int) -> None:
    assert len(parts) == num_sites
    joined = np.concatenate(parts)
    assert joined.size == n, "sites overlap or miss records"
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


@settings(max_examples=40, deadline=None)
@given(
    num_sites=st.integers(1, 20),
    method=st.sampled_from(["iid", "dirichlet"]),
    alpha=st.sampled_from([0.05, 0.1, 0.5, 1.0, 100.0]),
    seed=st.integers(0, 2**31),
)
def test_partition_disjoint_covering_deterministic_min_size(
    num_sites: int, method: str, alpha: float, seed: int
) -> None:
    _, y, _ = load_dataset("breast_cancer")
    train, _ = global_split("breast_cancer")
    labels = y[train]
    parts = partition(labels, num_sites, method, alpha, seed)
    _check_partition(parts, labels.size, num_sites)
    assert min(p.size for p in parts) >= 10
    again = partition(labels, num_sites, method, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if method == "iid":
        sizes = [p.size for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_partition_min_size_repair_when_redraws_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    # alpha=0.01 over 40 sites of 455 records: every draw leaves some site nearly empty
    import client.training.data as data

    repairs = []
    real_top_up = data._top_up
    monkeypatch.setattr(data, "_top_up", lambda *a: repairs.append(1) or real_top_up(*a))
    _, y, _ = load_dataset("breast_cancer")
    labels = y[global_split("breast_cancer")[0]]
    parts = partition(labels, 40, "dirichlet", 0.01, seed=3)
    assert repairs, "the repair path did not run"
    _check_partition(parts, labels.size, 40)
    assert min(p.size for p in parts) >= 10


def test_partition_rejects_bad_arguments() -> None:
    y = np.zeros(20, dtype=np.int64)
    with pytest.raises(ValueError):
        partition(y, 0)
    with pytest.raises(ValueError):
        partition(y, 21)
    with pytest.raises(ValueError):
        partition(y, 2, "shards")
    with pytest.raises(ValueError):
        partition(y, 2, "dirichlet", alpha=0.0)


def _mean_label_distance(labels: np.ndarray, parts: list[np.ndarray], k: int) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    overall = np.bincount(labels, minlength=k) / labels.size
    dists = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / p.size - overall).sum() for p in parts]
    return float(np.mean(dists))


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_dirichlet_split_is_label_skewed(name: str) -> None:
    _, y, k = load_dataset(name)
    labels = y[global_split(name)[0]]
    iid = [_mean_label_distance(labels, partition(labels, 5, "iid", seed=s), k) for s in range(3)]
    d05 = [_mean_label_distance(labels, partition(labels, 5, "dirichlet", 0.5, s), k) for s in range(3)]
    d01 = [_mean_label_distance(labels, partition(labels, 5, "dirichlet", 0.1, s), k) for s in range(3)]
    assert max(iid) < 0.1
    assert min(d05) > 0.2
    assert np.mean(d01) > np.mean(d05)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_site_data_shards_disjoint_cover_train_and_avoid_global_test(method: str) -> None:
    train, test = global_split("digits")
    sites = [site_data("digits", i, 4, method, 0.5, seed=7) for i in range(4)]
    all_idx = np.concatenate([s.indices for s in sites])
    assert np.array_equal(np.sort(all_idx), train)
    assert np.intersect1d(all_idx, test).size == 0
    for s in sites:
        assert s.num_train + s.num_test == s.indices.size
        assert s.num_test >= 1 and abs(s.num_test - 0.2 * s.indices.size) <= 1
        assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int64
        assert s.x_train.shape[1:] == (1, 8, 8)
        assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0


def test_site_data_local_split_disjoint_and_deterministic() -> None:
    x, y, _ = load_dataset("breast_cancer")
    a = site_data("breast_cancer", 2, 5, "dirichlet", 0.5, seed=1)
    b = site_data("breast_cancer", 2, 5, "dirichlet", 0.5, seed=1)
    for field in ("x_train", "y_train", "x_test", "y_test", "indices"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    # local train and test rows are different records of the shard
    features = preprocess("breast_cancer", x[a.indices])
    train_rows = {r.tobytes() for r in a.x_train}
    test_rows = {r.tobytes() for r in a.x_test}
    assert not train_rows & test_rows
    assert train_rows | test_rows == {r.tobytes() for r in features}
    c = site_data("breast_cancer", 2, 5, "dirichlet", 0.5, seed=2)
    assert not np.array_equal(a.indices, c.indices)


def test_site_index_out_of_range() -> None:
    with pytest.raises(ValueError):
        site_data("digits", 5, 5)


def test_breast_cancer_preprocessing_is_per_record_and_well_scaled() -> None:
    x, _, _ = load_dataset("breast_cancer")
    whole = preprocess("breast_cancer", x)
    # a record's features do not depend on which other records are preprocessed with it
    assert np.array_equal(preprocess("breast_cancer", x[:7]), whole[:7])
    assert np.array_equal(preprocess("breast_cancer", x[100:101]), whole[100:101])
    assert whole.dtype == np.float32 and np.isfinite(whole).all()
    # the card's ranges are rounded to a few digits, so records may overshoot a little
    assert whole.min() >= -1.2 and whole.max() <= 1.2
    assert np.all(whole.std(axis=0) > 0.05)  # no feature squashed flat


def test_breast_cancer_ranges_match_the_dataset_card() -> None:
    from sklearn.datasets import load_breast_cancer

    table = re.findall(r"^[a-z ]+\([a-z ]+\):\s+([0-9.]+)\s+([0-9.]+)$", load_breast_cancer().DESCR, re.M)
    assert [(float(lo), float(hi)) for lo, hi in table] == list(BREAST_CANCER_RANGES)


def test_digits_divided_by_16_and_global_test_data() -> None:
    x, y, _ = load_dataset("digits")
    xt, yt, k = global_test_data("digits")
    _, test = global_split("digits")
    assert k == 10 and np.array_equal(yt, y[test])
    assert np.allclose(xt, x[test] / 16.0)
