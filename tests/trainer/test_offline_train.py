"""trainer/offline.py + trainer/offline_train.py: a tiny end-to-end run, shipped configs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config.loader import ConfigError, load_config
from config.paths import REPO_ROOT
from features.sequence_batch import SequenceBatch
from trainer.checkpoint import load_model
from trainer.evaluate import metrics_from_ranks, retrieval_ranks
from trainer.offline import OfflineConfig, run_offline
from trainer.splits import EvalSet, leave_one_out

# The offline configs; trainer/configs/stream.yaml is the stream trainer's (tests/trainer/test_stream_train.py).
CONFIGS = sorted(p for p in (REPO_ROOT / "trainer" / "configs").glob("*.yaml") if p.name != "stream.yaml")
TINY = [
    "model.dim=16",
    "model.qk_dim=8",
    "model.v_dim=8",
    "model.max_seq_len=12",
    "model.num_time_buckets=8",
    "model.dropout=0.0",
    "model.input_dropout=0.0",
    "loss.num_negatives=8",
    "loss.temperature=0.1",
    "train.batch_size=16",
    "train.lr=0.01",
    "train.num_threads=1",
]


def pattern_split(num_users: int = 64, num_items: int = 30, length: int = 14) -> object:
    """Users walk the catalogue in steps of +1 from a random start: easy to learn."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, num_items, num_users)
    items = (starts[:, None] + np.arange(length)[None, :]) % num_items + 1
    n = num_users * length
    seqs = SequenceBatch(
        user_ids=np.arange(num_users, dtype=np.int64),
        offsets=np.arange(0, n + 1, length, dtype=np.int64),
        item_ids=items.reshape(-1).astype(np.int64),
        actions=np.zeros(n, dtype=np.int64),
        timestamps_ms=np.arange(n, dtype=np.int64) * 60_000,
        last_partition=np.full(num_users, -1, dtype=np.int64),
        last_offset=np.full(num_users, -1, dtype=np.int64),
    )
    return leave_one_out(seqs)


def test_tiny_training_run_learns(tmp_path: Path) -> None:
    config = load_config(OfflineConfig, overrides=[*TINY, "name=tiny", "train.epochs=8"])
    results = run_offline(config, out_dir=tmp_path, progress=False, split=pattern_split())
    losses = [e["loss"] for e in results["epochs"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert results["test"]["hr@10"] > 0.6  # chance is 10/30
    assert 1 <= results["best_epoch"] <= 8
    for name in ("metrics.json", "curves.png", "best.safetensors", "last.safetensors"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best_valid"]["ndcg@10"] == max(e["valid"]["ndcg@10"] for e in saved["epochs"])
    # per-user ranks at the chosen epoch: one per user, those of the best checkpoint (evaluated
    # afresh from the file) and of the validation figure recorded during training
    ranks = saved["ranks_at_best_epoch"]
    assert len(ranks["test"]) == len(ranks["valid"]) == 64
    best, _ = load_model(tmp_path / "best.safetensors")
    split = pattern_split()
    assert retrieval_ranks(best, split.test, max_seq_len=12).tolist() == ranks["test"]
    assert metrics_from_ranks(ranks["valid"]) == pytest.approx(saved["best_valid"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(OfflineConfig, path)
    assert config.name == path.stem
    assert config.model.dim == 50 and config.model.max_seq_len == 200 and config.loss.num_negatives == 128


def test_shipped_configs_reject_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer'.*hstu.yaml"):
        load_config(OfflineConfig, CONFIGS[0].with_name("hstu.yaml"), ["model.num_layer=3"])


@pytest.mark.slow
def test_cli_runs_one_epoch_on_ml100k(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "trainer.offline_train",
        "--config",
        "trainer/configs/hstu.yaml",
        "--out",
        str(tmp_path),
        "--no-progress",
        *TINY,
        "train.epochs=1",
        "train.batch_size=256",
        "train.save_checkpoints=false",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["dataset"] == "ml-100k" and summary["best_epoch"] == 1
    assert 0.0 <= summary["test"]["ndcg@10"] <= 1.0 and summary["test"]["count"] == 943
    assert not (tmp_path / "last.safetensors").exists() and (tmp_path / "metrics.json").exists()


def test_cli_rejects_bad_override(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "trainer.offline_train", "--config", "trainer/configs/hstu.yaml", "train.epoch=1"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown key 'train.epoch'" in done.stderr


def test_diagnostic_test_curve_never_chooses_the_epoch(tmp_path: Path) -> None:
    """train.diagnostic_test_curve: test ranks at every evaluation, the chosen epoch's equal to the
    reported test, and the choice itself the same as without the diagnostic."""
    base = [*TINY, "name=tiny", "train.epochs=4"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "diagnostic_ranks.npz").write_bytes(b"an earlier run's")  # must not survive the run
    plain = run_offline(
        load_config(OfflineConfig, overrides=base), out_dir=tmp_path / "plain", progress=False, split=pattern_split()
    )
    config = load_config(OfflineConfig, overrides=[*base, "train.diagnostic_test_curve=true"])
    results = run_offline(config, out_dir=tmp_path / "diag", progress=False, split=pattern_split())
    assert results["best_epoch"] == plain["best_epoch"] and results["test"] == plain["test"]
    with np.load(tmp_path / "diag" / "diagnostic_ranks.npz") as data:
        curve = {k: data[k] for k in data}
    assert curve["epoch"].tolist() == [1, 2, 3, 4]
    assert all(curve[k].shape == (4, 64) for k in ("valid", "test", "test_without_valid"))
    best = results["best_epoch"] - 1
    assert curve["test"][best].tolist() == results["ranks_at_best_epoch"]["test"]
    assert curve["valid"][best].tolist() == results["ranks_at_best_epoch"]["valid"]
    for epoch, record in zip(curve["epoch"], results["epochs"]):
        assert metrics_from_ranks(curve["test_without_valid"][epoch - 1]) == pytest.approx(
            record["diagnostic_test_without_valid"]
        )
    # test without valid, rebuilt by hand from the best checkpoint: the test targets ranked from the
    # training events (the validation context), the validation item left out of the ranking
    split = pattern_split()
    model, _ = load_model(tmp_path / "diag" / "best.safetensors")
    by_hand = EvalSet(
        history=split.train,
        targets=split.test.targets,
        target_actions=split.test.target_actions,
        target_timestamps_ms=split.test.target_timestamps_ms,
    )
    assert np.array_equal(split.valid.history.item_ids, split.train.item_ids)
    ranks = retrieval_ranks(model, by_hand, max_seq_len=12, exclude=split.test.history)
    assert ranks.tolist() == curve["test_without_valid"][best].tolist()
    assert ranks.tolist() != curve["test"][best].tolist()  # the validation event in the context matters
    assert not (tmp_path / "plain" / "diagnostic_ranks.npz").exists()


def test_publish_puts_the_chosen_model_in_the_registry(tmp_path: Path) -> None:
    from trainer.registry import Registry

    config = load_config(OfflineConfig, overrides=[*TINY, "name=tiny", "train.epochs=2", "model.layout=interleaved"])
    results = run_offline(
        config, out_dir=tmp_path / "run", progress=False, split=pattern_split(), publish=tmp_path / "registry"
    )
    loaded = Registry(tmp_path / "registry").load()
    assert loaded.version == 1 and loaded.manifest.metrics["test"] == results["test"]
    assert loaded.manifest.info == {"trainer": "offline", "name": "tiny", "dataset": "ml-100k"}
    best, _ = load_model(tmp_path / "run" / "best.safetensors")
    for name, tensor in best.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
