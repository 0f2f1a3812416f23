"""Why does a model comparison change from validation to test? Ratios at every epoch, three ways.

On ML-100K HSTU leads SASRec on validation (each user's second-to-last event) and trails on test
(the last event). Three things differ between the two figures, and this script separates them.
It reads runs trained with `train.diagnostic_test_curve=true`: their `diagnostic_ranks.npz` holds
each user's rank at every evaluation, for

- valid: the second-to-last event, ranked from the training events (the protocol's validation);
- test: the last event, ranked from the training events plus the validation event (the protocol's
  test);
- test_without_valid: the last event, ranked from the training events alone (the validation
  context and the test target; the validation item is still left out of the ranking).

It prints the ratio top / bottom of NDCG@10 for each, with its 95% interval over resampled users:

- at each run's chosen epoch (best validation NDCG@10, as the protocol reports): this has the
  choice of the epoch on the validation users in it;
- averaged over a window of epochs (`--from-epoch` to `--to-epoch`, default the last) with no
  choice made, so what is left of the gap there does not come from choosing the epoch; these lines
  also give the lowest and highest ratio of the seed means at any one epoch of the window.

Then the differences, resampling users with all their events together:

- valid - test: the gap itself;
- valid - test_without_valid: same context, a different target (the events differ; so do the
  candidates, by one item each way: the test item competes in the first, the validation item is
  left out of the second);
- test_without_valid - test: same target, with or without the validation event in the context.

    python benchmarks/valid_test_gap.py --top RUNS/hstu-ml-100k-seed{1,2,3} \\
        --bottom RUNS/sasrec-ml-100k-seed{1,2,3} --png benchmarks/valid_test_gap_ml100k_cpu.png

One JSON line per figure; a PNG of the three ratios per epoch and each model's curves.
The intervals resample users, not training runs: the seeds' spread is not in them.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/valid_test_gap.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.run_folders import (  # noqa: E402
    RunFolderError,
    add_paired_arguments,
    check_paired_arguments,
    check_same_data,
    load_run,
    one_model,
)
from trainer.metrics import ndcg_per_user, paired_bootstrap_ratio, paired_bootstrap_ratio_difference  # noqa: E402

SPLITS = ("valid", "test", "test_without_valid")
DIFFERENCES = (("valid", "test"), ("valid", "test_without_valid"), ("test_without_valid", "test"))


def load_curve(folder: Path, metrics: dict) -> dict[str, np.ndarray]:
    """The run's diagnostic_ranks.npz, checked against the run's own metrics.json."""
    if not metrics["config"].get("train", {}).get("diagnostic_test_curve"):
        raise RunFolderError(f"{folder}: trained without train.diagnostic_test_curve=true (no per-epoch test ranks)")
    path = folder / "diagnostic_ranks.npz"
    if not path.is_file():
        raise RunFolderError(f"{folder}: no diagnostic_ranks.npz (train with train.diagnostic_test_curve=true)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("epoch", *SPLITS) if k not in data]
            if missing:
                raise RunFolderError(f"{path}: missing {missing}")
            curve = {k: np.asarray(data[k]) for k in ("epoch", *SPLITS)}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise RunFolderError(f"{path}: not a readable .npz of integer ranks ({exc})") from None
    epochs = curve["epoch"]
    if epochs.ndim != 1 or epochs.size == 0:
        raise RunFolderError(f"{path}: 'epoch' must be a non-empty 1-D array, got shape {epochs.shape}")
    for split in SPLITS:
        if curve[split].ndim != 2 or curve[split].shape[0] != epochs.size:
            raise RunFolderError(f"{path}: {split!r} must be [epochs={epochs.size}, users], got {curve[split].shape}")
    best = np.flatnonzero(epochs == metrics["best_epoch"])
    if best.size != 1:
        raise RunFolderError(f"{folder}: its chosen epoch {metrics['best_epoch']} has no diagnostic ranks")
    # The npz must be this run's: at the chosen epoch it holds the ranks the run reported.
    for split, stored in metrics.get("ranks_at_best_epoch", {}).items():
        if not np.array_equal(curve[split][best[0]], np.asarray(stored)):
            raise RunFolderError(f"{path}: its {split} ranks at epoch {metrics['best_epoch']} are not the run's own")
    return curve


def load_side(folders: list[Path], side: str) -> tuple[str, list[dict], list[dict[str, np.ndarray]]]:
    """(model name, metrics of each run, each run's epochs and [epochs, users] NDCG@10 per split)."""
    runs = [load_run(folder, keys=("config", "dataset", "name", "best_epoch")) for folder in folders]
    curves = []
    for folder, metrics in zip(folders, runs):
        ranks = load_curve(folder, metrics)
        curves.append({"epoch": ranks["epoch"], **{split: ndcg_per_user(ranks[split]) for split in SPLITS}})
    return one_model(runs, side), runs, curves


def per_user(runs: list[dict], curves: list[dict], *, epochs: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each user's NDCG@10 per split, averaged over the runs (seeds) and over `epochs` (None: each
    run's chosen epoch); `curves` hold [epochs, users] NDCG@10 (from `load_side`)."""
    out = {}
    for split in SPLITS:
        per_run = []
        for metrics, curve in zip(runs, curves):
            rows = np.isin(curve["epoch"], [metrics["best_epoch"]] if epochs is None else epochs)
            per_run.append(curve[split][rows].mean(axis=0))
        out[split] = np.mean(per_run, axis=0)
    return out


def ratio_curves(top: list[dict], bottom: list[dict]) -> dict[str, np.ndarray]:
    """Per epoch: the ratio of the seed-mean NDCG@10 for each split, and each side's NDCG@10."""
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        means = {}
        for name, curves in (("top", top), ("bottom", bottom)):
            means[name] = np.mean([c[split].mean(axis=1) for c in curves], axis=0)
            out[f"{name}_{split}"] = means[name]
        out[f"ratio_{split}"] = means["top"] / np.maximum(means["bottom"], 1e-12)
    return out


def plot(curves: dict[str, np.ndarray], epochs: np.ndarray, names: tuple[str, str], window_start: int, png: Path) -> None:
    fig, (ax_ratio, ax_ndcg) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = {"valid": "tab:blue", "test": "tab:red", "test_without_valid": "tab:green"}
    for split in SPLITS:
        ax_ratio.plot(epochs, curves[f"ratio_{split}"], color=colours[split], label=split)
        for side, style in (("top", "-"), ("bottom", "--")):
            ax_ndcg.plot(epochs, curves[f"{side}_{split}"], style, color=colours[split],
                         label=f"{names[0 if side == 'top' else 1]} {split}")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ratio.axvline(window_start, color="grey", lw=0.8, ls=":")
    ax_ratio.set(xlabel="epoch", ylabel=f"{names[0]} / {names[1]} NDCG@10 (seed means)",
                 title="ratio per epoch (window starts at the dotted line)")
    ax_ndcg.set(xlabel="epoch", ylabel="NDCG@10 (seed mean)", title="each model")
    for ax in (ax_ratio, ax_ndcg):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_paired_arguments(parser)
    parser.add_argument("--from-epoch", type=int, default=26,
                        help="first epoch of the window averaged with no choice (default 26: the last 3/4 of 101)")
    parser.add_argument("--to-epoch", type=int, default=None, help="last epoch of that window (default: the last)")
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args(argv)
    check_paired_arguments(parser, args)
    try:
        top_name, top_runs, top_curves = load_side(args.top, "top")
        bottom_name, bottom_runs, bottom_curves = load_side(args.bottom, "bottom")
        check_same_data(top_runs + bottom_runs)
        all_curves = top_curves + bottom_curves
        epochs = all_curves[0]["epoch"]
        if any(not np.array_equal(c["epoch"], epochs) for c in all_curves):
            spans = ", ".join(f"{f}: {c['epoch'].size} evaluations, epochs {int(c['epoch'][0])}-{int(c['epoch'][-1])}"
                              for f, c in zip((*args.top, *args.bottom), all_curves))
            raise RunFolderError(f"the runs were evaluated at different epochs ({spans}): give runs of one length")
        users = {c[s].shape[1] for c in all_curves for s in SPLITS}
        if len(users) != 1:
            raise RunFolderError(f"the runs rank different numbers of users ({sorted(users)}): not the same users")
        last = int(epochs[-1]) if args.to_epoch is None else args.to_epoch
        window = epochs[(epochs >= args.from_epoch) & (epochs <= last)]
        if window.size == 0:
            raise RunFolderError(f"no evaluation in epochs {args.from_epoch}-{last} (evaluated: {int(epochs[0])}-{int(epochs[-1])})")
    except RunFolderError as exc:
        parser.error(str(exc))
    metric = f"{top_name}_over_{bottom_name}_ndcg@10"
    context = {"dataset": top_runs[0]["dataset"], "runs_top": len(top_runs), "runs_bottom": len(bottom_runs),
               "resamples": args.resamples}
    curves = ratio_curves(top_curves, bottom_curves)
    in_window = np.isin(epochs, window)
    for when, chosen in (("chosen_epoch", None), (f"epochs_{int(window[0])}-{int(window[-1])}", window)):
        top = per_user(top_runs, top_curves, epochs=chosen)
        bottom = per_user(bottom_runs, bottom_curves, epochs=chosen)
        for split in SPLITS:
            ci = paired_bootstrap_ratio(top[split], bottom[split], resamples=args.resamples, seed=args.seed)
            # the window's spread of the per-epoch ratio (of the seed means), epoch by epoch
            spread = {} if chosen is None else {
                "per_epoch_min": float(curves[f"ratio_{split}"][in_window].min()),
                "per_epoch_max": float(curves[f"ratio_{split}"][in_window].max()),
            }
            print(json.dumps({"metric": metric, "value": ci["ratio"], "unit": "ratio", "split": split, "when": when,
                              "ci95": [ci["low"], ci["high"]], "p_le_1": ci["p_le_1"],
                              "top_mean": float(top[split].mean()), "bottom_mean": float(bottom[split].mean()),
                              **spread, "users": ci["users"], **context}), flush=True)
        for a, b in DIFFERENCES:
            # users resampled with all their events: the same users for both ratios
            diff = paired_bootstrap_ratio_difference((top[a], bottom[a]), (top[b], bottom[b]),
                                                     resamples=args.resamples, seed=args.seed)
            print(json.dumps({"metric": f"{metric}_{a}_minus_{b}", "value": diff["value"], "unit": "ratio",
                              "when": when, "ci95": [diff["low"], diff["high"]], "p_le_0": diff["p_le_0"],
                              **context}), flush=True)
    plot(curves, epochs, (top_name, bottom_name), int(window[0]), args.png)
    print(f"[valid_test_gap] wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
