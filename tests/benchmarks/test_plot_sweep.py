"""benchmarks/plot_sweep.py: groups real (tiny) runs by a config value and picks it on validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infra.paths import REPO_ROOT
from tests.trainer.test_offline_train import TINY, pattern_split
from trainer.config import load_config
from trainer.offline import OfflineConfig, run_offline

SCRIPT = REPO_ROOT / "benchmarks" / "plot_sweep.py"


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep")
    folders = []
    for dropout in (0.0, 0.3):
        for seed in (1, 2):
            folder = root / f"d{dropout}-s{seed}"
            config = load_config(OfflineConfig, overrides=[
                *TINY, "name=tiny", "train.epochs=2", f"model.dropout={dropout}", f"train.seed={seed}",
                "train.save_checkpoints=false",
            ])
            run_offline(config, out_dir=folder, progress=False, split=pattern_split())
            folders.append(folder)
    return folders


def test_groups_by_value_and_chooses_on_validation(runs: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    done = sweep("--key", "model.dropout", "--png", str(png), *map(str, runs))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    points = {ln["key_value"]: ln for ln in lines if ln["metric"] == "sweep_ndcg@10"}
    assert sorted(points) == [0.0, 0.3]
    for value, folders in ((0.0, runs[:2]), (0.3, runs[2:])):
        saved = [json.loads((f / "metrics.json").read_text()) for f in folders]
        assert points[value]["valid_ndcg@10"] == pytest.approx(np.mean([s["best_valid"]["ndcg@10"] for s in saved]))
        assert points[value]["value"] == pytest.approx(np.mean([s["test"]["ndcg@10"] for s in saved]))
        assert points[value]["seeds"] == [1, 2] and points[value]["split"] == "test"
    (chosen,) = [ln for ln in lines if ln["metric"] == "chosen_on_validation"]
    best = max(points, key=lambda v: points[v]["valid_ndcg@10"])  # validation decides, never test
    assert chosen["value"] == best and chosen["test_ndcg@10"] == points[best]["value"]
    assert chosen["values_tried"] == [0.0, 0.3] and chosen["seeds_per_value"] == [2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_a_repeated_seed_and_a_key_that_is_not_a_number(runs: list[Path], tmp_path: Path) -> None:
    done = sweep("--key", "model.dropout", "--png", str(tmp_path / "x.png"), str(runs[0]), str(runs[0]))
    assert done.returncode == 2 and "a second run of tiny" in done.stderr
    done = sweep("--key", "model.encoder", "--png", str(tmp_path / "x.png"), str(runs[0]))
    assert done.returncode == 2 and "not a number" in done.stderr
    done = sweep("--key", "model.no_such_key", "--png", str(tmp_path / "x.png"), str(runs[0]))
    assert done.returncode == 2 and "has no 'model.no_such_key'" in done.stderr
    assert not (tmp_path / "x.png").exists()
