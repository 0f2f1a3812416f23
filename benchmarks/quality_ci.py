"""How sure is a quality ratio? The paired bootstrap over users for runs already made.

`benchmarks/quality.py` trains side by side and prints each target ratio (HSTU / SASRec test
NDCG@10) with its 95% interval over resampled test users. This script gives the same figures for
run folders that already exist (each holds `metrics.json` and `best.safetensors` from
`trainer.offline_train`), so that older runs and runs of a hyper-parameter grid can be compared
on the same footing:

    python benchmarks/quality_ci.py --top RUNS/hstu-ml-100k-seed{1,2,3} \\
        --bottom RUNS/sasrec-ml-100k-seed{1,2,3}

The per-user ranks at the chosen epoch come from `metrics.json` when it has them
(`ranks_at_best_epoch`, written since this script exists) and are otherwise recomputed from the
best checkpoint on the run's dataset (`HSTU_SHARED_DATA` or `../shared/data`). Each user's NDCG@10
is averaged over the runs of a side (the seeds), so the ratio is the ratio of the seed means; the
users are then resampled, the same users for both sides. Prints one JSON line per split (test,
valid): the ratio, its 95% interval, and the share of resamples in which it is <= 1; then the
validation ratio minus the test ratio, with its interval from resampling users with both their
held-out events (does the comparison change from a user's second-to-last event to the last by
more than the choice of users explains?).

What the intervals leave out: the seeds' spread (they resample users, not training runs), and,
for the validation ratio, the choice of the epoch on those same validation users, which the
resampling does not redo, so each model's validation figure is optimistic by its own amount.
All runs must share their data config: users are paired by position (the split orders them by
user id).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/quality_ci.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.run_folders import (  # noqa: E402
    RunFolderError,
    add_paired_arguments,
    check_paired_arguments,
    check_same_data,
    load_run,
    one_model,
)
from trainer.metrics import (  # noqa: E402
    mean_ndcg_per_user,
    ndcg_per_user,
    paired_bootstrap_ratio,
    paired_bootstrap_ratio_difference,
)


# How far a recomputed NDCG@10 may be from the run's own figure (about one near-tie flipping).
RECOMPUTE_TOLERANCE = 1e-4


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_ranks(folder: Path, splits: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Per-user ranks {valid, test} at the run's chosen epoch, and its metrics.json."""
    metrics = load_run(folder, keys=("config", "dataset", "name"))
    if "ranks_at_best_epoch" in metrics:
        return {k: np.asarray(v, dtype=np.int64) for k, v in metrics["ranks_at_best_epoch"].items()}, metrics
    checkpoint = folder / "best.safetensors"
    if not checkpoint.exists():
        raise SystemExit(f"{folder}: metrics.json has no per-user ranks and there is no best.safetensors to recompute them")
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
            raise SystemExit(f"{folder}: recomputed {name} NDCG@10 {got:.6f} != the run's {reported['ndcg@10']:.6f}")
    log(f"[quality_ci] recomputed the ranks of {folder} from its best checkpoint")
    return ranks, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="paired bootstrap interval of a test NDCG@10 ratio over users")
    add_paired_arguments(parser)
    args = parser.parse_args(argv)
    check_paired_arguments(parser, args)
    splits: dict = {}
    sides = {}
    try:
        for side in ("top", "bottom"):
            loaded = [run_ranks(folder, splits) for folder in getattr(args, side)]
            sides[side] = (loaded, loaded[0][1]["dataset"], one_model([m for _, m in loaded], side))
        # Users are paired by position: every run must be on the same data, hence the same users in order.
        check_same_data([m for loaded, _, _ in sides.values() for _, m in loaded])
    except RunFolderError as exc:
        raise SystemExit(str(exc)) from None
    sizes = {len(r[split]) for loaded, _, _ in sides.values() for r, _ in loaded for split in ("valid", "test")}
    if len(sizes) != 1:
        raise SystemExit(f"the runs rank different numbers of users ({sorted(sizes)}): not the same users")
    metric = f"{sides['top'][2]}_over_{sides['bottom'][2]}_ndcg@10"
    per_user = {
        split: {
            side: mean_ndcg_per_user([r[split] for r, _ in loaded])
            for side, (loaded, _, _) in sides.items()
        }
        for split in ("test", "valid")
    }
    context = {"dataset": sides["top"][1], "runs_top": len(args.top), "runs_bottom": len(args.bottom),
               "resamples": args.resamples}
    for split in ("test", "valid"):
        top, bottom = per_user[split]["top"], per_user[split]["bottom"]
        ci = paired_bootstrap_ratio(top, bottom, resamples=args.resamples, seed=args.seed)
        print(json.dumps({
            "metric": metric, "value": ci["ratio"], "unit": "ratio", "split": split, "ci95": [ci["low"], ci["high"]],
            "p_le_1": ci["p_le_1"], "users": ci["users"], "top_mean": float(top.mean()),
            "bottom_mean": float(bottom.mean()), **context,
        }), flush=True)
    # Does the comparison change from a user's second-to-last event to the last by more than the
    # choice of users explains? Users are resampled with both their events.
    swing = paired_bootstrap_ratio_difference(
        (per_user["valid"]["top"], per_user["valid"]["bottom"]), (per_user["test"]["top"], per_user["test"]["bottom"]),
        resamples=args.resamples, seed=args.seed,
    )
    print(json.dumps({
        "metric": f"{metric}_valid_minus_test", "value": swing["value"], "unit": "ratio",
        "ci95": [swing["low"], swing["high"]], "p_le_0": swing["p_le_0"], **context,
    }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
