"""Reading the run folders that `trainer.offline_train` (or `benchmarks/quality.py --out`) writes,
for the scripts that compare runs already made (plot_quality, plot_sweep, quality_ci,
valid_test_gap). One reader, so each refuses an unfinished or foreign folder in the same words.

    metrics = load_run(folder, keys=("config", "epochs", "test"))
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def check_same_data(runs: list[dict]) -> None:
    """Runs compared user by user must share their data config (the split orders users by id)."""
    datas = {json.dumps(m["config"]["data"], sort_keys=True) for m in runs}
    if len(datas) != 1:
        raise RunFolderError(f"the runs differ in their data config ({sorted(datas)}): not the same users")


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


def check_paired_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses (exit 2) fewer than one resample and a run folder given twice."""
    if args.resamples < 1:
        parser.error(f"--resamples ({args.resamples}) must be >= 1")
    folders = [f.resolve() for f in (*args.top, *args.bottom)]
    if len(set(folders)) != len(folders):
        parser.error("a run folder is given twice (within or across --top and --bottom); each run counts once")
