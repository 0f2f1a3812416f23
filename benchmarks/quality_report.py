"""Reports on quality runs already made: bootstrap intervals, the validation-test gap, curves, sweeps.

`python -m benchmarks.quality --out DIR` and `python -m trainer.offline_train --out DIR` leave
one folder per run (`metrics.json`, `best.safetensors`, with `train.diagnostic_test_curve=true`
also `diagnostic_ranks.npz`). This tool reads such folders and trains nothing; one subcommand per
question, each run from the repository root:

    # How sure is a ratio? Paired bootstrap over users of top / bottom NDCG@10 (test, valid)
    python -m benchmarks.quality_report intervals --top RUNS/hstu-ml-100k-seed{1,2,3} \\
        --bottom RUNS/sasrec-ml-100k-seed{1,2,3}
    # Why does a comparison change from validation to test? Ratios at every epoch, three ways
    python -m benchmarks.quality_report gap --top RUNS/hstu-ml-100k-seed{1,2,3} \\
        --bottom RUNS/sasrec-ml-100k-seed{1,2,3} --png benchmarks/valid_test_gap_ml100k_cpu.png
    # Validation NDCG@10 per epoch, runs side by side (one panel per dataset)
    python -m benchmarks.quality_report curves RUN [RUN ...] --png benchmarks/quality_hstu_ml100k_cpu.png
    # A sweep of one config key: NDCG@10 per value, the value chosen on validation
    python -m benchmarks.quality_report sweep --key model.dropout \\
        --png benchmarks/sweep_dropout_ml100k_cpu.png RUNS/*/hstu-ml-100k-seed* RUNS/*/sasrec-ml-100k-seed*

Every figure is one JSON line on stdout ({"metric", "value", "unit", ...context}); progress goes
to stderr. A folder that is not a finished run, or runs that cannot be compared (other data, two
models on one side, a folder given twice, runs of different lengths), is refused with exit
status 2 and the reason, before any figure or PNG is written. `intervals --help` and the other
subcommands' help say what each figure leaves out.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from trainer.metrics import mean_ndcg_per_user, ndcg_per_user, paired_bootstrap_ratio, paired_bootstrap_ratio_difference


def log(message: str) -> None:
    print(f"[quality_report] {message}", file=sys.stderr, flush=True)


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def save(fig: Figure, png: Path, *, dpi: int) -> None:
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi)
    log(f"wrote {png}")


# --- The run-folder reader --------------------------------------------------------------------


class RunFolderError(ValueError):
    """A folder that is not a finished offline_train run, or runs that cannot be compared."""


def load_run(folder: Path, *, keys: tuple[str, ...] = ("config", "dataset")) -> dict:
    """metrics.json of a finished run that has every key in `keys`; RunFolderError otherwise."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise RunFolderError(f"{folder}: no metrics.json (not a trainer.offline_train run folder)")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise RunFolderError(f"{path}: not a JSON object")
    if metrics.get("complete") is False:
        raise RunFolderError(f"{folder}: the run did not finish (metrics.json says complete=false)")
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise RunFolderError(f"{path}: missing {missing} (an unfinished or foreign run)")
    if metrics.get("complete") is not True:
        raise RunFolderError(f"{folder}: the run did not finish (metrics.json has no complete=true)")
    return metrics


# What `curves` and `sweep` read of a run.
CURVE_KEYS = ("config", "epochs", "best_epoch", "test", "dataset")


def check_same_data(runs: list[dict]) -> None:
    """Runs compared user by user must share their data config (the split orders users by id)."""
    datas = {json.dumps(m["config"]["data"], sort_keys=True) for m in runs}
    if len(datas) != 1:
        raise RunFolderError(f"the runs differ in their data config ({sorted(datas)}): not the same users")


def check_same_users(sizes: set[int]) -> None:
    """Users are paired by position: every run must rank the same number of them."""
    if len(sizes) != 1:
        raise RunFolderError(f"the runs rank different numbers of users ({sorted(sizes)}): not the same users")


def one_model(runs: list[dict], side: str) -> str:
    """The one model name of a side's runs (its seeds); a side that mixes models is refused."""
    names = {m["name"] for m in runs}
    if len(names) != 1:
        raise RunFolderError(f"--{side} mixes models {sorted(names)}: give one model's runs (its seeds) per side")
    return names.pop()


def add_paired_arguments(parser: argparse.ArgumentParser) -> None:
    """--top and --bottom run folders (each side one model's seeds), --resamples and --seed."""
    parser.add_argument("--top", type=Path, nargs="+", required=True, help="run folders of the numerator (seeds)")
    parser.add_argument("--bottom", type=Path, nargs="+", required=True, help="run folders of the denominator")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the users")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def check_paired_arguments(args: argparse.Namespace) -> None:
    """Refuses fewer than one resample and a run folder given twice."""
    if args.resamples < 1:
        raise RunFolderError(f"--resamples ({args.resamples}) must be >= 1")
    folders = [f.resolve() for f in (*args.top, *args.bottom)]
    if len(set(folders)) != len(folders):
        raise RunFolderError("a run folder is given twice (within or across --top and --bottom); each run counts once")


# --- intervals: how sure is a ratio? ------------------------------------------------------------

INTERVALS = """\
The paired bootstrap over users of a test NDCG@10 ratio, for runs already made.

Each user's NDCG@10 at the run's chosen epoch is averaged over the runs of a side (the seeds), so
the ratio is that of the seed means; the users are then resampled, the same users for both sides.
One JSON line per split (test, valid): the ratio, its 95% interval and the share of resamples in
which it is <= 1; then the validation ratio minus the test ratio, users resampled with both their
held-out events (does the comparison change from a user's second-to-last event to the last by
more than the choice of users explains?). The ranks come from metrics.json
(`ranks_at_best_epoch`), or are recomputed from `best.safetensors` on the run's dataset
(HSTU_SHARED_DATA or ../shared/data) and checked against the run's reported NDCG@10.

Left out: the seeds' spread (users are resampled, not training runs) and, for the validation
ratio, the choice of the epoch on those same users, so each validation figure is optimistic by
its own amount. All runs must share their data config: users are paired by position."""

# How far a recomputed NDCG@10 may be from the run's own figure (about one near-tie flipping).
RECOMPUTE_TOLERANCE = 1e-4


def run_ranks(folder: Path, splits: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Per-user ranks {valid, test} at the run's chosen epoch, and its metrics.json; `splits`
    caches the loaded datasets across runs."""
    metrics = load_run(folder, keys=("config", "dataset", "name"))
    if "ranks_at_best_epoch" in metrics:
        return {k: np.asarray(v, dtype=np.int64) for k, v in metrics["ranks_at_best_epoch"].items()}, metrics
    checkpoint = folder / "best.safetensors"
    if not checkpoint.exists():
        raise RunFolderError(
            f"{folder}: metrics.json has no per-user ranks and there is no best.safetensors to recompute them"
        )
    # Only an older run folder needs the model: torch and the trainer load here, not at import.
    import torch

    from trainer.checkpoint import load_model
    from trainer.evaluate import retrieval_ranks
    from trainer.offline import DataConfig, load_split

    torch.set_num_threads(1)
    data = metrics["config"]["data"]
    key = (data["dataset"], data["min_events"])
    if key not in splits:
        splits[key] = load_split(DataConfig(dataset=data["dataset"], min_events=data["min_events"]))
    split = splits[key]
    model, _ = load_model(checkpoint)
    max_len = metrics["config"]["model"]["max_seq_len"]
    ranks = {name: retrieval_ranks(model, getattr(split, name), max_seq_len=max_len) for name in ("valid", "test")}
    # The recomputed ranks must give the figures the run reported, or the checkpoint is not that
    # run's. The tolerance allows a few near-ties to flip (a run trained on a GPU, recomputed here).
    for name, reported in (("test", metrics["test"]), ("valid", metrics["best_valid"])):
        got = float(ndcg_per_user(ranks[name]).mean())
        if abs(got - reported["ndcg@10"]) > RECOMPUTE_TOLERANCE:
            raise RunFolderError(
                f"{folder}: recomputed {name} NDCG@10 {got:.6f} != the run's {reported['ndcg@10']:.6f}"
            )
    log(f"recomputed the ranks of {folder} from its best checkpoint")
    return ranks, metrics


def intervals(args: argparse.Namespace) -> int:
    check_paired_arguments(args)
    splits: dict = {}
    sides = {}
    for side in ("top", "bottom"):
        loaded = [run_ranks(folder, splits) for folder in getattr(args, side)]
        sides[side] = (loaded, loaded[0][1]["dataset"], one_model([m for _, m in loaded], side))
    check_same_data([m for loaded, _, _ in sides.values() for _, m in loaded])
    check_same_users(
        {len(r[split]) for loaded, _, _ in sides.values() for r, _ in loaded for split in ("valid", "test")}
    )
    metric = f"{sides['top'][2]}_over_{sides['bottom'][2]}_ndcg@10"
    per_user = {
        split: {side: mean_ndcg_per_user([r[split] for r, _ in loaded]) for side, (loaded, _, _) in sides.items()}
        for split in ("test", "valid")
    }
    context = {
        "dataset": sides["top"][1],
        "runs_top": len(args.top),
        "runs_bottom": len(args.bottom),
        "resamples": args.resamples,
    }
    for split in ("test", "valid"):
        top, bottom = per_user[split]["top"], per_user[split]["bottom"]
        ci = paired_bootstrap_ratio(top, bottom, resamples=args.resamples, seed=args.seed)
        emit(
            {
                "metric": metric,
                "value": ci["ratio"],
                "unit": "ratio",
                "split": split,
                "ci95": [ci["low"], ci["high"]],
                "p_le_1": ci["p_le_1"],
                "users": ci["users"],
                "top_mean": float(top.mean()),
                "bottom_mean": float(bottom.mean()),
                **context,
            }
        )
    swing = paired_bootstrap_ratio_difference(
        (per_user["valid"]["top"], per_user["valid"]["bottom"]),
        (per_user["test"]["top"], per_user["test"]["bottom"]),
        resamples=args.resamples,
        seed=args.seed,
    )
    emit(
        {
            "metric": f"{metric}_valid_minus_test",
            "value": swing["value"],
            "unit": "ratio",
            "ci95": [swing["low"], swing["high"]],
            "p_le_0": swing["p_le_0"],
            **context,
        }
    )
    return 0


# --- gap: why does a comparison change from validation to test? -------------------------------

GAP = """\
Ratios top / bottom of NDCG@10 at every epoch, three ways, from runs trained with
train.diagnostic_test_curve=true (their diagnostic_ranks.npz holds each user's rank at every
evaluation):

- valid: the second-to-last event, ranked from the training events (the protocol's validation);
- test: the last event, ranked from the training events plus the validation event (the test);
- test_without_valid: the last event, ranked from the training events alone (the validation
  context with the test target; the validation item is still left out of the ranking).

Each with its 95% interval over resampled users, at each run's chosen epoch (best validation
NDCG@10: the choice of the epoch is in it) and averaged over a window of epochs (--from-epoch to
--to-epoch) with no choice made; window lines also give the lowest and highest per-epoch ratio of
the seed means. Then the differences valid - test (the gap), valid - test_without_valid (same
context, another target) and test_without_valid - test (same target, with or without the
validation event), users resampled with all their events. A PNG of the three ratios per epoch
and each model's curves. The intervals resample users, not training runs."""

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
            curve = {k: np.asarray(data[k]) for k in ("epoch", *SPLITS) if k in data}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise RunFolderError(f"{path}: not a readable .npz of integer ranks ({exc})") from None
    missing = [k for k in ("epoch", *SPLITS) if k not in curve]
    if missing:
        raise RunFolderError(f"{path}: missing {missing}")
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


def plot_gap(
    curves: dict[str, np.ndarray], epochs: np.ndarray, names: tuple[str, str], window_start: int, png: Path
) -> None:
    fig = Figure(figsize=(13, 4.5))
    ax_ratio, ax_ndcg = fig.subplots(1, 2)
    colours = {"valid": "tab:blue", "test": "tab:red", "test_without_valid": "tab:green"}
    for split in SPLITS:
        ax_ratio.plot(epochs, curves[f"ratio_{split}"], color=colours[split], label=split)
        for side, style in (("top", "-"), ("bottom", "--")):
            ax_ndcg.plot(
                epochs,
                curves[f"{side}_{split}"],
                style,
                color=colours[split],
                label=f"{names[0 if side == 'top' else 1]} {split}",
            )
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ratio.axvline(window_start, color="grey", lw=0.8, ls=":")
    ax_ratio.set(
        xlabel="epoch",
        ylabel=f"{names[0]} / {names[1]} NDCG@10 (seed means)",
        title="ratio per epoch (window starts at the dotted line)",
    )
    ax_ndcg.set(xlabel="epoch", ylabel="NDCG@10 (seed mean)", title="each model")
    for ax in (ax_ratio, ax_ndcg):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, png, dpi=110)


def gap(args: argparse.Namespace) -> int:
    check_paired_arguments(args)
    top_name, top_runs, top_curves = load_side(args.top, "top")
    bottom_name, bottom_runs, bottom_curves = load_side(args.bottom, "bottom")
    check_same_data(top_runs + bottom_runs)
    all_curves = top_curves + bottom_curves
    epochs = all_curves[0]["epoch"]
    if any(not np.array_equal(c["epoch"], epochs) for c in all_curves):
        spans = ", ".join(
            f"{f}: {c['epoch'].size} evaluations, epochs {int(c['epoch'][0])}-{int(c['epoch'][-1])}"
            for f, c in zip((*args.top, *args.bottom), all_curves)
        )
        raise RunFolderError(f"the runs were evaluated at different epochs ({spans}): give runs of one length")
    check_same_users({c[s].shape[1] for c in all_curves for s in SPLITS})
    last = int(epochs[-1]) if args.to_epoch is None else args.to_epoch
    window = epochs[(epochs >= args.from_epoch) & (epochs <= last)]
    if window.size == 0:
        raise RunFolderError(
            f"no evaluation in epochs {args.from_epoch}-{last} (evaluated: {int(epochs[0])}-{int(epochs[-1])})"
        )
    metric = f"{top_name}_over_{bottom_name}_ndcg@10"
    context = {
        "dataset": top_runs[0]["dataset"],
        "runs_top": len(top_runs),
        "runs_bottom": len(bottom_runs),
        "resamples": args.resamples,
    }
    curves = ratio_curves(top_curves, bottom_curves)
    in_window = np.isin(epochs, window)
    for when, chosen in (("chosen_epoch", None), (f"epochs_{int(window[0])}-{int(window[-1])}", window)):
        top = per_user(top_runs, top_curves, epochs=chosen)
        bottom = per_user(bottom_runs, bottom_curves, epochs=chosen)
        for split in SPLITS:
            ci = paired_bootstrap_ratio(top[split], bottom[split], resamples=args.resamples, seed=args.seed)
            # the window's spread of the per-epoch ratio (of the seed means), epoch by epoch
            spread = (
                {}
                if chosen is None
                else {
                    "per_epoch_min": float(curves[f"ratio_{split}"][in_window].min()),
                    "per_epoch_max": float(curves[f"ratio_{split}"][in_window].max()),
                }
            )
            emit(
                {
                    "metric": metric,
                    "value": ci["ratio"],
                    "unit": "ratio",
                    "split": split,
                    "when": when,
                    "ci95": [ci["low"], ci["high"]],
                    "p_le_1": ci["p_le_1"],
                    "top_mean": float(top[split].mean()),
                    "bottom_mean": float(bottom[split].mean()),
                    **spread,
                    "users": ci["users"],
                    **context,
                }
            )
        for a, b in DIFFERENCES:
            # users resampled with all their events: the same users for both ratios
            diff = paired_bootstrap_ratio_difference(
                (top[a], bottom[a]), (top[b], bottom[b]), resamples=args.resamples, seed=args.seed
            )
            emit(
                {
                    "metric": f"{metric}_{a}_minus_{b}",
                    "value": diff["value"],
                    "unit": "ratio",
                    "when": when,
                    "ci95": [diff["low"], diff["high"]],
                    "p_le_0": diff["p_le_0"],
                    **context,
                }
            )
    plot_gap(curves, epochs, (top_name, bottom_name), int(window[0]), args.png)
    return 0


# --- curves: validation NDCG@10 per epoch -------------------------------------------------------

CURVES = """\
Validation NDCG@10 per epoch of finished runs, side by side, as one PNG; runs of one dataset
share a panel. The legend names the model, its query time (HSTU) and the test NDCG@10 at the
epoch chosen on validation (marked). One JSON line per run: that test NDCG@10."""


def label(metrics: dict) -> str:
    model = metrics["config"]["model"]
    name = metrics["config"].get("name", model["encoder"])
    if model["encoder"] == "hstu" and model.get("num_time_buckets"):
        name += f", query time {model.get('query_time', 'token')}"
    return f"{name}: test {metrics['test']['ndcg@10']:.4f} (epoch {metrics['best_epoch']})"


def plot_curves(runs: list[dict], png: Path) -> None:
    datasets = sorted({r["dataset"] for r in runs})
    fig = Figure(figsize=(6.5 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for run in (r for r in runs if r["dataset"] == dataset):
            evaluated = [e for e in run["epochs"] if "valid" in e]
            (line,) = ax.plot(
                [e["epoch"] for e in evaluated], [e["valid"]["ndcg@10"] for e in evaluated], label=label(run)
            )
            best = next(e for e in evaluated if e["epoch"] == run["best_epoch"])
            ax.plot([best["epoch"]], [best["valid"]["ndcg@10"]], "o", color=line.get_color())
        ax.set(title=f"{dataset}: validation NDCG@10 (dot: epoch chosen)", xlabel="epoch", ylabel="NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    save(fig, png, dpi=120)


def curves(args: argparse.Namespace) -> int:
    runs = [load_run(folder, keys=CURVE_KEYS) for folder in args.runs]
    for folder, run in zip(args.runs, runs):
        emit(
            {
                "metric": "test_ndcg@10",
                "value": run["test"]["ndcg@10"],
                "unit": "ndcg",
                "run": str(folder),
                "dataset": run["dataset"],
                "label": label(run),
            }
        )
    plot_curves(runs, args.png)
    return 0


# --- sweep: one config key, the value chosen on validation -----------------------------------

SWEEP = """\
A hyper-parameter sweep of finished runs: validation and test NDCG@10 per value of one config key.

Tuning on validation, the same budget for every model: each model runs the same number of values
of --key (e.g. model.dropout) over the same seeds; its value is the one with the best mean
validation NDCG@10 at the chosen epochs, and only then is its test NDCG@10 read. Runs are grouped
by (model name, dataset, value read from metrics.json); one JSON line per group (means over the
seeds), one per model naming the value chosen on validation, and a PNG of both splits per value."""


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
        metrics = load_run(folder, keys=CURVE_KEYS)
        name, value = metrics["config"]["name"], config_value(metrics, key, folder)
        ident = (name, metrics["dataset"], value, metrics["config"]["train"]["seed"])
        if ident in seen:
            raise RunFolderError(
                f"{folder}: a second run of {name} on {metrics['dataset']} at {key}={value}, seed {ident[3]}"
            )
        seen.add(ident)
        groups[(name, metrics["dataset"])][value].append(metrics)
    check_same_budget(groups, key)
    return groups


def check_same_budget(groups: dict, key: str) -> None:
    """On each dataset every (model, value) ran the same seeds and every model the same number of values."""
    for dataset in sorted({d for _, d in groups}):
        models = {m: by_value for (m, d), by_value in groups.items() if d == dataset}
        seed_sets = {
            (m, v): sorted(r["config"]["train"]["seed"] for r in runs)
            for m, by_value in models.items()
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
            lines.append(
                {
                    "metric": "sweep_ndcg@10",
                    "value": float(np.mean(test)),
                    "unit": "ndcg",
                    "split": "test",
                    "valid_ndcg@10": float(np.mean(valid)),
                    "test_sd": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                    "valid_per_seed": valid,
                    "test_per_seed": test,
                    "seeds": [r["config"]["train"]["seed"] for r in runs],
                    "best_epochs": [r["best_epoch"] for r in runs],
                    "model": model,
                    "dataset": dataset,
                    "key": key,
                    "key_value": value,
                }
            )
            if np.mean(valid) > best_valid:
                best_value, best_valid = value, float(np.mean(valid))
        chosen = next(
            ln for ln in lines if ln["model"] == model and ln["dataset"] == dataset and ln["key_value"] == best_value
        )
        lines.append(
            {
                "metric": "chosen_on_validation",
                "value": best_value,
                "unit": key,
                "model": model,
                "dataset": dataset,
                "valid_ndcg@10": best_valid,
                "test_ndcg@10": chosen["value"],
                "values_tried": sorted(by_value),
                "seeds_per_value": sorted({len(runs) for runs in by_value.values()}),
            }
        )
    return lines


def plot_sweep(lines: list[dict], key: str, png: Path) -> None:
    datasets = sorted({ln["dataset"] for ln in lines})
    fig = Figure(figsize=(6.5 * len(datasets), 4.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        points = [ln for ln in lines if ln["metric"] == "sweep_ndcg@10" and ln["dataset"] == dataset]
        for model in sorted({ln["model"] for ln in points}):
            mine = sorted((ln for ln in points if ln["model"] == model), key=lambda ln: ln["key_value"])
            xs = [ln["key_value"] for ln in mine]
            (valid,) = ax.plot(xs, [ln["valid_ndcg@10"] for ln in mine], "o--", label=f"{model} validation")
            ax.errorbar(
                xs,
                [ln["value"] for ln in mine],
                yerr=[ln["test_sd"] for ln in mine],
                fmt="s-",
                color=valid.get_color(),
                capsize=3,
                label=f"{model} test (sd over seeds)",
            )
            chosen = next(
                ln
                for ln in lines
                if ln["metric"] == "chosen_on_validation" and ln["model"] == model and ln["dataset"] == dataset
            )
            ax.axvline(chosen["value"], color=valid.get_color(), alpha=0.25, lw=6)
        ax.set(
            title=f"{dataset}: NDCG@10 at the chosen epoch, mean over seeds\n(band: value chosen on validation)",
            xlabel=key,
            ylabel="NDCG@10",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, png, dpi=120)


def sweep(args: argparse.Namespace) -> int:
    lines = summarise(group_runs(args.runs, args.key), args.key)
    for line in lines:
        emit(line)
    plot_sweep(lines, args.key, args.png)
    return 0


# --- The command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_report", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    sub = commands.add_parser(
        "intervals",
        help="paired bootstrap interval of a NDCG@10 ratio over users",
        description=INTERVALS,
        formatter_class=fmt,
    )
    add_paired_arguments(sub)
    sub.set_defaults(run=intervals, error=sub.error)
    sub = commands.add_parser(
        "gap", help="validation vs test ratios at every epoch, three ways", description=GAP, formatter_class=fmt
    )
    add_paired_arguments(sub)
    sub.add_argument(
        "--from-epoch",
        type=int,
        default=26,
        help="first epoch of the window averaged with no choice (default 26: the last 3/4 of 101)",
    )
    sub.add_argument("--to-epoch", type=int, default=None, help="last epoch of that window (default: the last)")
    sub.add_argument("--png", type=Path, required=True)
    sub.set_defaults(run=gap, error=sub.error)
    sub = commands.add_parser(
        "curves", help="validation NDCG@10 per epoch as a PNG", description=CURVES, formatter_class=fmt
    )
    sub.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.json)")
    sub.add_argument("--png", type=Path, required=True)
    sub.set_defaults(run=curves, error=sub.error)
    sub = commands.add_parser(
        "sweep",
        help="NDCG@10 per value of one config key, chosen on validation",
        description=SWEEP,
        formatter_class=fmt,
    )
    sub.add_argument("runs", nargs="+", type=Path, help="run folders of the sweep (every model, value and seed)")
    sub.add_argument("--key", required=True, help="the swept config key, e.g. model.dropout")
    sub.add_argument("--png", type=Path, required=True)
    sub.set_defaults(run=sweep, error=sub.error)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RunFolderError as exc:
        args.error(str(exc))  # prints the subcommand's usage and the reason, exits 2
    return 2  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
