"""MovieLens -> engagement events -> recorded log: counts, actions, partitioning, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from config.paths import REPO_ROOT
from features.movielens import DatasetError, load_ratings, movielens_events
from infra.datasets.movielens import write_movielens_log
from streaming.events import ActionVocab, decode_values, encode_values
from streaming.log_source import LogSource
from streaming.recorded_log import read_log

# Rating counts from each dataset's PROVENANCE.md.
ML100K_RATINGS = {"rate_1": 6_110, "rate_2": 11_370, "rate_3": 27_145, "rate_4": 34_174, "rate_5": 21_201}
SUBSET_RATINGS = {"rate_1": 27_472, "rate_2": 53_838, "rate_3": 127_216, "rate_4": 170_579, "rate_5": 108_545}


def test_ml100k_events_counts_and_order():
    ev = movielens_events("ml-100k")
    assert list(ev.columns) == ["user_id", "item_id", "action", "ts_ms"]
    assert (len(ev), ev.user_id.nunique(), ev.item_id.nunique()) == (100_000, 943, 1_682)
    assert ev.action.value_counts().to_dict() == ML100K_RATINGS
    assert ev.ts_ms.is_monotonic_increasing
    assert (ev.ts_ms.min(), ev.ts_ms.max()) == (874_724_710_000, 893_286_638_000)
    # Ties keep the file's order: the multiset of rows is the file's.
    raw = load_ratings("ml-100k")
    assert sorted(zip(raw.user_id, raw.item_id, raw.ts_ms)) == sorted(zip(ev.user_id, ev.item_id, ev.ts_ms))


def test_ml100k_log_partitions_by_user_and_decodes_back(tmp_path):
    path = tmp_path / "ml100k.parquet"
    assert write_movielens_log("ml-100k", path, num_partitions=4) == 100_000
    log = read_log(path)
    assert (log.topic, log.num_partitions, len(log)) == ("engagements", 4, 100_000)
    src = LogSource(log)
    users_per_partition = []
    total = 0
    for p in src.list_parts():
        batch = src.build_part(p).next_batch(200_000)
        valid, invalid = batch.decode(vocab=ActionVocab.movielens(), now_ms=10**13)
        assert invalid.num_rows == 0
        assert batch.keys.to_pylist() == [b"%d" % u for u in valid.column("user_id").to_pylist()]
        ts = valid.column("ts_ms").to_numpy()
        assert (np.diff(ts) >= 0).all()  # offsets follow time within a partition
        users_per_partition.append(set(valid.column("user_id").to_pylist()))
        total += valid.num_rows
    assert total == 100_000
    assert sum(len(u) for u in users_per_partition) == 943  # each user in exactly one partition
    assert all(len(u) > 100 for u in users_per_partition)


def test_ml1m_subset_counts():
    ev = movielens_events("ml-1m-subset")
    assert (len(ev), ev.user_id.nunique(), ev.item_id.nunique()) == (487_650, 2_999, 3_615)
    assert ev.action.value_counts().to_dict() == SUBSET_RATINGS
    head = ev.iloc[:1000]
    values = encode_values(head.user_id, head.item_id, head.action, head.ts_ms)
    valid, invalid = decode_values(values, 0, np.arange(1000), vocab=ActionVocab.movielens(), now_ms=10**13)
    assert valid.num_rows == 1000 and invalid.num_rows == 0


def test_cli_writes_the_subset_log(tmp_path):
    out = tmp_path / "subset.parquet"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.datasets",
            "movielens",
            "--dataset",
            "ml-1m-subset",
            "--out",
            str(out),
            "--partitions",
            "3",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "487,650 events, 2,999 users, 3,615 items" in res.stdout
    log = read_log(out)
    assert (len(log), log.num_partitions) == (487_650, 3)


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'ml-20m'"):
        movielens_events("ml-20m")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.datasets",
            "movielens",
            "--dataset",
            "ml-20m",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "invalid choice: 'ml-20m'" in res.stderr
