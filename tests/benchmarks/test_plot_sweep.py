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


def fake_run(folder: Path, *, name: str, value: float, seed: int, valid: float, test: float) -> str:
    """A finished run's metrics.json, written by hand so validation and test can disagree."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "complete": True, "dataset": "ml-100k", "best_epoch": 3, "epochs": [],
        "config": {"name": name, "model": {"dropout": value}, "train": {"seed": seed}},
        "best_valid": {"ndcg@10": valid}, "test": {"ndcg@10": test},
    }))
    return str(folder)


def test_the_value_is_chosen_on_validation_even_where_test_disagrees(tmp_path: Path) -> None:
    folders = [
        # value 0.2: better on validation; value 0.5: better on test
        fake_run(tmp_path / "a", name="m", value=0.2, seed=1, valid=0.30, test=0.10),
        fake_run(tmp_path / "b", name="m", value=0.2, seed=2, valid=0.28, test=0.12),
        fake_run(tmp_path / "c", name="m", value=0.5, seed=1, valid=0.20, test=0.40),
        fake_run(tmp_path / "d", name="m", value=0.5, seed=2, valid=0.22, test=0.38),
    ]
    done = sweep("--key", "model.dropout", "--png", str(tmp_path / "s.png"), *folders)
    assert done.returncode == 0, done.stderr
    (chosen,) = [json.loads(x) for x in done.stdout.splitlines() if '"chosen_on_validation"' in x]
    assert chosen["value"] == 0.2 and chosen["valid_ndcg@10"] == pytest.approx(0.29)
    assert chosen["test_ndcg@10"] == pytest.approx(0.11)


def test_refuses_a_sweep_with_unequal_budgets(tmp_path: Path) -> None:
    base = [fake_run(tmp_path / f"m{v}{s}", name="m", value=v, seed=s, valid=0.2, test=0.1)
            for v in (0.2, 0.5) for s in (1, 2)]
    # the other model: one seed missing at one value
    other = [fake_run(tmp_path / f"o{v}{s}", name="o", value=v, seed=s, valid=0.2, test=0.1)
             for v, s in ((0.2, 1), (0.2, 2), (0.5, 1))]
    done = sweep("--key", "model.dropout", "--png", str(tmp_path / "x.png"), *base, *other)
    assert done.returncode == 2 and "ran the same seeds" in done.stderr
    # the other model: fewer values
    fewer = [fake_run(tmp_path / f"f{s}", name="f", value=0.2, seed=s, valid=0.2, test=0.1) for s in (1, 2)]
    done = sweep("--key", "model.dropout", "--png", str(tmp_path / "x.png"), *base, *fewer)
    assert done.returncode == 2 and "different numbers of model.dropout values" in done.stderr
    assert not (tmp_path / "x.png").exists()
