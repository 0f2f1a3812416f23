"""benchmarks/plot_quality.py: curves of real (tiny) offline runs; foreign folders are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infra.paths import REPO_ROOT
from tests.trainer.test_offline_train import TINY, pattern_split
from trainer.config import load_config
from trainer.offline import OfflineConfig, run_offline

SCRIPT = REPO_ROOT / "benchmarks" / "plot_quality.py"


def test_plots_runs_and_prints_their_test_ndcg(tmp_path: Path) -> None:
    folders = []
    for query_time in ("token", "next"):
        folder = tmp_path / query_time
        config = load_config(OfflineConfig, overrides=[*TINY, "train.epochs=3", f"model.query_time={query_time}"])
        run_offline(config, out_dir=folder, progress=False, split=pattern_split())
        folders.append(folder)
    png = tmp_path / "plots" / "curves.png"
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, folders), "--png", str(png)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    for line, folder in zip(lines, folders):
        saved = json.loads((folder / "metrics.json").read_text())
        assert line["value"] == saved["test"]["ndcg@10"] and line["metric"] == "test_ndcg@10"
    assert [("query time next" in line["label"]) for line in lines] == [False, True]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_a_folder_without_metrics(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.json").write_text(json.dumps({"config": {}}))
    for folder, reason in ((tmp_path, "no metrics.json"), (tmp_path / "half", "missing")):
        done = subprocess.run([sys.executable, str(SCRIPT), str(folder), "--png", str(tmp_path / "x.png")],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert done.returncode == 2 and reason in done.stderr
    assert not (tmp_path / "x.png").exists()
