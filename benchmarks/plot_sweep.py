"""A hyper-parameter sweep of finished `offline_train` runs: validation and test NDCG@10 per value.

Tuning on validation, the same budget for every model: each model is run at the same number of
values of one config key (for example `model.dropout`), over the same seeds; its value is the
one with the best mean validation NDCG@10 at the chosen epochs, and only then is its test
NDCG@10 read. This script groups run folders by (model name, dataset, value of `--key`, read
from each run's metrics.json), prints one JSON line per group (means over the seeds) and one per
model naming the value chosen on validation, and plots both splits against the value.

    python benchmarks/plot_sweep.py --key model.dropout --png benchmarks/sweep_dropout_ml100k_cpu.png \\
        RUNS/*/hstu-ml-100k-seed* RUNS/*/sasrec-ml-100k-seed*
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/plot_sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.plot_quality import load_run  # noqa: E402
from benchmarks.run_folders import RunFolderError  # noqa: E402


def config_value(metrics: dict, key: str, folder: Path) -> float:
    node = metrics["config"]
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise RunFolderError(f"{folder}: its config has no {key!r}")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise RunFolderError(f"{folder}: {key} is {node!r}, not a number")
    return float(node)


def group_runs(folders: list[Path], key: str) -> dict[tuple[str, str], dict[float, list[dict]]]:
    """{(model, dataset): {value: [metrics of each seed]}}; a seed twice in one group is refused."""
    groups: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple] = set()
    for folder in folders:
        metrics = load_run(folder)
        name, value = metrics["config"]["name"], config_value(metrics, key, folder)
        ident = (name, metrics["dataset"], value, metrics["config"]["train"]["seed"])
        if ident in seen:
            raise RunFolderError(f"{folder}: a second run of {name} on {metrics['dataset']} at {key}={value}, seed {ident[3]}")
        seen.add(ident)
        groups[(name, metrics["dataset"])][value].append(metrics)
    check_same_budget(groups, key)
    return groups


def check_same_budget(groups: dict, key: str) -> None:
    """On each dataset every (model, value) ran the same seeds and every model the same number of values."""
    for dataset in sorted({d for _, d in groups}):
        models = {m: by_value for (m, d), by_value in groups.items() if d == dataset}
        seed_sets = {
            (m, v): sorted(r["config"]["train"]["seed"] for r in runs) for m, by_value in models.items()
            for v, runs in by_value.items()
        }
        if len({tuple(s) for s in seed_sets.values()}) != 1:
            raise RunFolderError(f"{dataset}: not every (model, {key}) ran the same seeds: {seed_sets}")
        counts = {m: len(by_value) for m, by_value in models.items()}
        if len(set(counts.values())) != 1:
            raise RunFolderError(f"{dataset}: the models tried different numbers of {key} values: {counts}")


def summarise(groups: dict, key: str) -> list[dict]:
    lines = []
    for (model, dataset), by_value in sorted(groups.items()):
        best_value, best_valid = None, -1.0
        for value, runs in sorted(by_value.items()):
            valid = [r["best_valid"]["ndcg@10"] for r in runs]
            test = [r["test"]["ndcg@10"] for r in runs]
            lines.append({
                "metric": "sweep_ndcg@10", "value": float(np.mean(test)), "unit": "ndcg", "split": "test",
                "valid_ndcg@10": float(np.mean(valid)), "test_sd": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                "valid_per_seed": valid, "test_per_seed": test, "seeds": [r["config"]["train"]["seed"] for r in runs],
                "best_epochs": [r["best_epoch"] for r in runs], "model": model, "dataset": dataset, "key": key,
                "key_value": value,
            })
            if np.mean(valid) > best_valid:
                best_value, best_valid = value, float(np.mean(valid))
        chosen = next(ln for ln in lines if ln["model"] == model and ln["dataset"] == dataset and ln["key_value"] == best_value)
        lines.append({
            "metric": "chosen_on_validation", "value": best_value, "unit": key, "model": model, "dataset": dataset,
            "valid_ndcg@10": best_valid, "test_ndcg@10": chosen["value"], "values_tried": sorted(by_value),
            "seeds_per_value": sorted({len(runs) for runs in by_value.values()}),
        })
    return lines


def plot(lines: list[dict], key: str, png: Path) -> None:
    datasets = sorted({ln["dataset"] for ln in lines})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        points = [ln for ln in lines if ln["metric"] == "sweep_ndcg@10" and ln["dataset"] == dataset]
        for model in sorted({ln["model"] for ln in points}):
            mine = sorted((ln for ln in points if ln["model"] == model), key=lambda ln: ln["key_value"])
            xs = [ln["key_value"] for ln in mine]
            (valid,) = ax.plot(xs, [ln["valid_ndcg@10"] for ln in mine], "o--", label=f"{model} validation")
            ax.errorbar(xs, [ln["value"] for ln in mine], yerr=[ln["test_sd"] for ln in mine], fmt="s-",
                        color=valid.get_color(), capsize=3, label=f"{model} test (sd over seeds)")
            chosen = next(ln for ln in lines if ln["metric"] == "chosen_on_validation" and ln["model"] == model
                          and ln["dataset"] == dataset)
            ax.axvline(chosen["value"], color=valid.get_color(), alpha=0.25, lw=6)
        ax.set_title(f"{dataset}: NDCG@10 at the chosen epoch, mean over seeds\n(band: value chosen on validation)")
        ax.set_xlabel(key)
        ax.set_ylabel("NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="validation and test NDCG@10 of a sweep over one config key")
    parser.add_argument("folders", type=Path, nargs="+", help="finished offline_train run folders")
    parser.add_argument("--key", required=True, help="the swept config key, e.g. model.dropout")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        groups = group_runs(args.folders, args.key)
    except RunFolderError as exc:
        parser.error(str(exc))
    lines = summarise(groups, args.key)
    for line in lines:
        print(json.dumps(line), flush=True)
    plot(lines, args.key, args.png)
    print(f"[plot_sweep] wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
