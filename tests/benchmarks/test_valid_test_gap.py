"""benchmarks/valid_test_gap.py: ratios at the chosen epoch and over a window, three ways, from real tiny runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infra.paths import REPO_ROOT
from tests.trainer.test_offline_train import TINY, pattern_split
from trainer.config import load_config
from trainer.metrics import ndcg_per_user, resample_users
from trainer.offline import OfflineConfig, run_offline

SCRIPT = REPO_ROOT / "benchmarks" / "valid_test_gap.py"


def gap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("gap")
    out: dict[str, list[Path]] = {"top": [], "bottom": [], "plain": []}
    for side, name, seeds, extra in (("top", "tiny", (1, 2), ["train.lr=0.01"]),
                                     ("bottom", "slow", (1, 2), ["train.lr=0.002"]),
                                     ("plain", "slow", (3,), ["train.lr=0.002"])):
        for seed in seeds:
            diag = [] if side == "plain" else ["train.diagnostic_test_curve=true"]
            config = load_config(OfflineConfig, overrides=[*TINY, *extra, *diag, f"name={name}", "train.epochs=4",
                                                           f"train.seed={seed}"])
            folder = root / f"{name}-{side}-{seed}"
            run_offline(config, out_dir=folder, progress=False, split=pattern_split())
            out[side].append(folder)
    return out


def by_hand(folders: list[Path], split: str, epochs: list[int] | None) -> np.ndarray:
    per_run = []
    for folder in folders:
        best = json.loads((folder / "metrics.json").read_text())["best_epoch"]
        with np.load(folder / "diagnostic_ranks.npz") as data:
            rows = np.isin(data["epoch"], [best] if epochs is None else epochs)
            per_run.append(ndcg_per_user(data[split][rows]).mean(axis=0))
    return np.mean(per_run, axis=0)


def test_ratios_and_differences_match_a_hand_computation(runs: dict, tmp_path: Path) -> None:
    png = tmp_path / "gap.png"
    done = gap("--top", *map(str, runs["top"]), "--bottom", *map(str, runs["bottom"]), "--from-epoch", "3",
               "--png", str(png), "--resamples", "200")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 12 and png.stat().st_size > 0
    figures = {(line["metric"], line.get("split"), line["when"]): line for line in lines}
    for when, epochs in (("chosen_epoch", None), ("epochs_3-4", [3, 4])):
        ratio = {}
        for split in ("valid", "test", "test_without_valid"):
            top, bottom = by_hand(runs["top"], split, epochs), by_hand(runs["bottom"], split, epochs)
            ratio[split] = top.mean() / bottom.mean()
            line = figures[("tiny_over_slow_ndcg@10", split, when)]
            assert line["value"] == pytest.approx(ratio[split])
            assert line["ci95"][0] <= line["value"] <= line["ci95"][1]
        for a, b in (("valid", "test"), ("valid", "test_without_valid"), ("test_without_valid", "test")):
            line = figures[(f"tiny_over_slow_ndcg@10_{a}_minus_{b}", None, when)]
            assert line["value"] == pytest.approx(ratio[a] - ratio[b])
        # the interval of one difference, by hand: each resample draws a user with all its events
        top = {k: by_hand(runs["top"], k, epochs) for k in ("valid", "test")}
        bottom = {k: by_hand(runs["bottom"], k, epochs) for k in ("valid", "test")}
        idx = resample_users(top["test"].size, resamples=200, seed=0)
        diffs = (top["valid"][idx].mean(1) / bottom["valid"][idx].mean(1)
                 - top["test"][idx].mean(1) / bottom["test"][idx].mean(1))
        line = figures[("tiny_over_slow_ndcg@10_valid_minus_test", None, when)]
        assert line["ci95"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)])
    done = gap("--top", *map(str, runs["top"]), "--bottom", *map(str, runs["bottom"]), "--from-epoch", "2",
               "--to-epoch", "3", "--png", str(png), "--resamples", "50")
    window = {(line["metric"], line.get("split")): line for line in map(json.loads, done.stdout.splitlines())
              if line["when"] == "epochs_2-3"}
    top, bottom = by_hand(runs["top"], "test", [2, 3]), by_hand(runs["bottom"], "test", [2, 3])
    assert window[("tiny_over_slow_ndcg@10", "test")]["value"] == pytest.approx(top.mean() / bottom.mean())
    per_epoch = [by_hand(runs["top"], "test", [e]).mean() / by_hand(runs["bottom"], "test", [e]).mean() for e in (2, 3)]
    assert window[("tiny_over_slow_ndcg@10", "test")]["per_epoch_max"] == pytest.approx(max(per_epoch))
    assert window[("tiny_over_slow_ndcg@10", "test")]["per_epoch_min"] == pytest.approx(min(per_epoch))
    # at the chosen epoch, valid and test are the figures the runs reported themselves
    for side, folders in (("top", runs["top"]), ("bottom", runs["bottom"])):
        reported = [json.loads((f / "metrics.json").read_text()) for f in folders]
        mean_test = np.mean([m["test"]["ndcg@10"] for m in reported])
        line = figures[("tiny_over_slow_ndcg@10", "test", "chosen_epoch")]
        assert line[f"{side}_mean"] == pytest.approx(mean_test)


def test_refuses_runs_without_the_diagnostic_and_a_window_past_the_end(runs: dict, tmp_path: Path) -> None:
    png = str(tmp_path / "x.png")
    done = gap("--top", *map(str, runs["top"]), "--bottom", *map(str, runs["plain"]), "--png", png)
    assert done.returncode == 2 and "trained without train.diagnostic_test_curve=true" in done.stderr
    done = gap("--top", *map(str, runs["top"]), "--bottom", *map(str, runs["bottom"]), "--from-epoch", "9", "--png", png)
    assert done.returncode == 2 and "no evaluation in epochs 9-4 (evaluated: 1-4)" in done.stderr
    done = gap("--top", str(runs["top"][0]), str(runs["bottom"][0]), "--bottom", str(runs["bottom"][1]), "--png", png)
    assert done.returncode == 2 and "mixes models" in done.stderr
    done = gap("--top", str(runs["top"][0]), "--bottom", str(runs["top"][0]), "--png", png)
    assert done.returncode == 2 and "given twice" in done.stderr
    # an npz that is not the run's own, a run trained without the diagnostic, a broken npz
    # (a plain run with a diagnostic npz copied in), a missing npz
    for name, reason in (("other", "are not the run's own"), ("plain", "trained without"), ("broken", "not a readable"),
                         ("missing", "no diagnostic_ranks.npz")):
        folder = tmp_path / name
        shutil.copytree(runs["plain" if name == "plain" else "bottom"][0], folder)
        if name == "other":
            shutil.copy(runs["bottom"][1] / "diagnostic_ranks.npz", folder / "diagnostic_ranks.npz")
        elif name == "plain":
            shutil.copy(runs["bottom"][1] / "diagnostic_ranks.npz", folder / "diagnostic_ranks.npz")
        elif name == "broken":
            (folder / "diagnostic_ranks.npz").write_bytes(b"not a zip")
        else:
            (folder / "diagnostic_ranks.npz").unlink()
        done = gap("--top", *map(str, runs["top"]), "--bottom", str(folder), "--png", png)
        assert done.returncode == 2 and reason in done.stderr, (name, done.stderr)
    # runs of different lengths
    short = tmp_path / "short"
    config = load_config(OfflineConfig, overrides=[*TINY, "train.lr=0.002", "train.diagnostic_test_curve=true",
                                                   "name=slow", "train.epochs=3", "train.seed=1"])
    run_offline(config, out_dir=short, progress=False, split=pattern_split())
    done = gap("--top", *map(str, runs["top"]), "--bottom", str(short), "--png", png)
    assert done.returncode == 2 and "evaluated at different epochs" in done.stderr and "epochs 1-3" in done.stderr
    assert not Path(png).exists()
