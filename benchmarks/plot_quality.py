"""Validation NDCG@10 per epoch of finished `offline_train` runs, side by side, as one PNG.

Each run folder (written by `trainer/offline_train.py` or `benchmarks/quality.py --out`) holds a
metrics.json; the legend names the model, its query time (HSTU) and the test NDCG@10 at the
epoch chosen on validation (marked). Runs of one dataset share a panel.

    python benchmarks/plot_quality.py RUN_DIR [RUN_DIR ...] --png benchmarks/quality_ml1m_cpu.png

Prints one JSON line per run (test NDCG@10 at the best validation epoch) and writes the PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if __package__ in (None, ""):  # run as `python benchmarks/plot_quality.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run_folders  # noqa: E402
from benchmarks.run_folders import RunFolderError  # noqa: E402


def load_run(folder: Path) -> dict:
    return run_folders.load_run(folder, keys=("config", "epochs", "best_epoch", "test", "dataset"))


def label(metrics: dict) -> str:
    model = metrics["config"]["model"]
    name = metrics["config"].get("name", model["encoder"])
    if model["encoder"] == "hstu" and model.get("num_time_buckets"):
        name += f", query time {model.get('query_time', 'token')}"
    return f"{name}: test {metrics['test']['ndcg@10']:.4f} (epoch {metrics['best_epoch']})"


def plot(runs: list[dict], png: Path) -> None:
    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for run in (r for r in runs if r["dataset"] == dataset):
            evaluated = [e for e in run["epochs"] if "valid" in e]
            (line,) = ax.plot([e["epoch"] for e in evaluated], [e["valid"]["ndcg@10"] for e in evaluated], label=label(run))
            best = next(e for e in evaluated if e["epoch"] == run["best_epoch"])
            ax.plot([best["epoch"]], [best["valid"]["ndcg@10"]], "o", color=line.get_color())
        ax.set_title(f"{dataset}: validation NDCG@10 (dot: epoch chosen)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="offline_train run folders (each with metrics.json)")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        runs = [load_run(folder) for folder in args.runs]
    except RunFolderError as err:
        print(f"plot_quality: {err}", file=sys.stderr)
        return 2
    for folder, run in zip(args.runs, runs):
        print(json.dumps({"metric": "test_ndcg@10", "value": run["test"]["ndcg@10"], "unit": "ndcg",
                          "run": str(folder), "dataset": run["dataset"], "label": label(run)}))
    plot(runs, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
