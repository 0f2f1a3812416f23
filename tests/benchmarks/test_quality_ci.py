"""benchmarks/quality_ci.py: the users' interval of a ratio, from stored ranks or recomputed from checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.paths import REPO_ROOT
from tests.trainer.test_offline_train import TINY

SCRIPT = REPO_ROOT / "benchmarks" / "quality_ci.py"


def ci(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def train(folder: Path, seed: int) -> dict:
    cmd = [
        sys.executable, "-m", "trainer.offline_train", "--config", "trainer/configs/hstu.yaml", "--out", str(folder),
        "--no-progress", *TINY, "train.epochs=1", "train.batch_size=256", f"train.seed={seed}",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_interval_from_stored_and_recomputed_ranks_agree(tmp_path: Path) -> None:
    a, b = train(tmp_path / "a", seed=1), train(tmp_path / "b", seed=2)
    stored = ci("--top", str(tmp_path / "a"), "--bottom", str(tmp_path / "b"))
    assert stored.returncode == 0, stored.stderr
    lines = [json.loads(x) for x in stored.stdout.splitlines()]
    assert [ln.get("split") for ln in lines] == ["test", "valid", None]
    swing = lines[2]
    assert swing["metric"] == "hstu_over_hstu_ndcg@10_valid_minus_test"
    assert swing["value"] == pytest.approx(lines[1]["value"] - lines[0]["value"])
    assert swing["ci95"][0] <= swing["value"] <= swing["ci95"][1]
    test = lines[0]
    assert test["value"] == pytest.approx(a["test"]["ndcg@10"] / b["test"]["ndcg@10"])
    assert test["users"] == 943 and test["ci95"][0] <= test["value"] <= test["ci95"][1]
    assert lines[1]["value"] == pytest.approx(a["best_valid"]["ndcg@10"] / b["best_valid"]["ndcg@10"])
    # an older run folder: no ranks in metrics.json, so they are recomputed from best.safetensors
    shutil.copytree(tmp_path / "a", tmp_path / "old")
    old = json.loads((tmp_path / "old" / "metrics.json").read_text())
    del old["ranks_at_best_epoch"]
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(old))
    recomputed = ci("--top", str(tmp_path / "old"), "--bottom", str(tmp_path / "b"))
    assert recomputed.returncode == 0, recomputed.stderr
    assert "recomputed the ranks" in recomputed.stderr
    assert recomputed.stdout == stored.stdout
    # a checkpoint that is not the run's is caught by its test or validation NDCG@10
    shutil.copy(tmp_path / "b" / "best.safetensors", tmp_path / "old" / "best.safetensors")
    wrong = ci("--top", str(tmp_path / "old"), "--bottom", str(tmp_path / "b"))
    assert wrong.returncode != 0 and re.search(r"recomputed (test|valid) NDCG@10 [\d.]+ != the run's", wrong.stderr)


def test_refuses_unfinished_runs_and_mixed_datasets(tmp_path: Path) -> None:
    def folder(dirname: str, **metrics) -> str:
        (tmp_path / dirname).mkdir()
        (tmp_path / dirname / "metrics.json").write_text(json.dumps(metrics))
        return str(tmp_path / dirname)

    ranks = {"test": [0, 1], "valid": [1, 0]}

    def config(dataset: str) -> dict:
        return {"data": {"dataset": dataset, "min_events": 3}}

    done_100k = folder("a", complete=True, dataset="ml-100k", name="hstu", ranks_at_best_epoch=ranks,
                       config=config("ml-100k"))
    done_1m = folder("b", complete=True, dataset="ml-1m-subset", name="sasrec", ranks_at_best_epoch=ranks,
                     config=config("ml-1m-subset"))
    other = folder("d", complete=True, dataset="ml-100k", name="sasrec", ranks_at_best_epoch=ranks,
                   config=config("ml-100k"))
    fewer_users = folder("e", complete=True, dataset="ml-100k", name="sasrec", config=config("ml-100k"),
                         ranks_at_best_epoch={"test": [0], "valid": [1]})
    unfinished = folder("c", complete=False, dataset="ml-100k", name="sasrec")
    assert ci("--top", done_100k, "--bottom", other).returncode == 0  # the well-formed pair passes
    out = ci("--top", done_100k, "--bottom", done_1m)
    assert out.returncode != 0 and "not the same users" in out.stderr
    out = ci("--top", done_100k, "--bottom", fewer_users)
    assert out.returncode != 0 and "different numbers of users" in out.stderr
    out = ci("--top", done_100k, other, "--bottom", other)
    assert out.returncode == 2 and "given twice" in out.stderr
    out = ci("--top", done_100k, other, "--bottom", fewer_users)
    assert out.returncode != 0 and "mixes models" in out.stderr
    out = ci("--top", done_100k, "--bottom", other, "--resamples", "0")
    assert out.returncode == 2 and "--resamples (0) must be >= 1" in out.stderr
    out = ci("--top", done_100k, "--bottom", unfinished)
    assert out.returncode != 0 and "did not finish" in out.stderr
    out = ci("--top", done_100k, "--bottom", str(tmp_path / "missing"))
    assert out.returncode != 0 and "no metrics.json" in out.stderr
