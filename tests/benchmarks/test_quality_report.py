"""benchmarks/quality_report.py: each subcommand on real (tiny) runs, and every refusal.

The real CLI (`python -m benchmarks.quality_report`) runs where the process matters (a fresh
interpreter that loads a checkpoint; the module runs with `-m`); elsewhere `main(argv)` runs in
this process, which is the same code path and a few seconds faster per call.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality_report
from config.loader import load_config
from config.paths import REPO_ROOT
from tests.trainer.test_offline_train import TINY, pattern_split
from trainer.metrics import ndcg_per_user, resample_users
from trainer.offline import OfflineConfig, run_offline


def cli(*args: str) -> subprocess.CompletedProcess:
    """The tool as a person runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.quality_report", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def report(*args: str) -> subprocess.CompletedProcess:
    """`main(argv)` in this process, with its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = quality_report.main(list(args))
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def tiny_run(folder: Path, *overrides: str) -> Path:
    config = load_config(OfflineConfig, overrides=[*TINY, *overrides])
    run_offline(config, out_dir=folder, progress=False, split=pattern_split())
    return folder


def metrics_file(folder: Path, **metrics) -> str:
    """A run folder whose metrics.json is written by hand."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


# --- intervals ----------------------------------------------------------------------------------


def train_cli(folder: Path, seed: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "trainer.offline_train",
        "--config",
        "trainer/configs/hstu.yaml",
        "--out",
        str(folder),
        "--no-progress",
        *TINY,
        "train.epochs=1",
        "train.batch_size=256",
        f"train.seed={seed}",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_intervals_from_stored_and_recomputed_ranks_agree(tmp_path: Path) -> None:
    a, b = train_cli(tmp_path / "a", seed=1), train_cli(tmp_path / "b", seed=2)
    stored = cli("intervals", "--top", str(tmp_path / "a"), "--bottom", str(tmp_path / "b"))
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
    recomputed = cli("intervals", "--top", str(tmp_path / "old"), "--bottom", str(tmp_path / "b"))
    assert recomputed.returncode == 0, recomputed.stderr
    assert "recomputed the ranks" in recomputed.stderr
    assert recomputed.stdout == stored.stdout
    # a checkpoint that is not the run's is caught by its test or validation NDCG@10
    shutil.copy(tmp_path / "b" / "best.safetensors", tmp_path / "old" / "best.safetensors")
    wrong = cli("intervals", "--top", str(tmp_path / "old"), "--bottom", str(tmp_path / "b"))
    assert wrong.returncode != 0 and re.search(r"recomputed (test|valid) NDCG@10 [\d.]+ != the run's", wrong.stderr)


def test_intervals_refuse_unfinished_runs_and_mixed_datasets(tmp_path: Path) -> None:
    ranks = {"test": [0, 1], "valid": [1, 0]}

    def config(dataset: str) -> dict:
        return {"data": {"dataset": dataset, "min_events": 3}}

    done_100k = metrics_file(
        tmp_path / "a",
        complete=True,
        dataset="ml-100k",
        name="hstu",
        ranks_at_best_epoch=ranks,
        config=config("ml-100k"),
    )
    done_1m = metrics_file(
        tmp_path / "b",
        complete=True,
        dataset="ml-1m-subset",
        name="sasrec",
        ranks_at_best_epoch=ranks,
        config=config("ml-1m-subset"),
    )
    other = metrics_file(
        tmp_path / "d",
        complete=True,
        dataset="ml-100k",
        name="sasrec",
        ranks_at_best_epoch=ranks,
        config=config("ml-100k"),
    )
    fewer_users = metrics_file(
        tmp_path / "e",
        complete=True,
        dataset="ml-100k",
        name="sasrec",
        config=config("ml-100k"),
        ranks_at_best_epoch={"test": [0], "valid": [1]},
    )
    unfinished = metrics_file(tmp_path / "c", complete=False, dataset="ml-100k", name="sasrec")
    no_ranks = metrics_file(tmp_path / "f", complete=True, dataset="ml-100k", name="sasrec", config=config("ml-100k"))
    assert report("intervals", "--top", done_100k, "--bottom", other).returncode == 0  # the well-formed pair passes
    for args, reason in (
        (("--top", done_100k, "--bottom", done_1m), "not the same users"),
        (("--top", done_100k, "--bottom", fewer_users), "different numbers of users"),
        (("--top", done_100k, other, "--bottom", other), "given twice"),
        (("--top", done_100k, other, "--bottom", fewer_users), "mixes models"),
        (("--top", done_100k, "--bottom", other, "--resamples", "0"), "--resamples (0) must be >= 1"),
        (("--top", done_100k, "--bottom", unfinished), "did not finish"),
        (("--top", done_100k, "--bottom", str(tmp_path / "missing")), "no metrics.json"),
        (("--top", done_100k, "--bottom", no_ranks), "no best.safetensors to recompute them"),
    ):
        done = report("intervals", *args)
        assert done.returncode == 2 and reason in done.stderr and not done.stdout, (reason, done.stderr)


# --- gap ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gap_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("gap")
    out: dict[str, list[Path]] = {"top": [], "bottom": [], "plain": []}
    for side, name, seeds, lr in (
        ("top", "tiny", (1, 2), "0.01"),
        ("bottom", "slow", (1, 2), "0.002"),
        ("plain", "slow", (3,), "0.002"),
    ):
        for seed in seeds:
            diag = [] if side == "plain" else ["train.diagnostic_test_curve=true"]
            out[side].append(
                tiny_run(
                    root / f"{name}-{side}-{seed}",
                    f"train.lr={lr}",
                    *diag,
                    f"name={name}",
                    "train.epochs=4",
                    f"train.seed={seed}",
                )
            )
    return out


def by_hand(folders: list[Path], split: str, epochs: list[int] | None) -> np.ndarray:
    per_run = []
    for folder in folders:
        best = json.loads((folder / "metrics.json").read_text())["best_epoch"]
        with np.load(folder / "diagnostic_ranks.npz") as data:
            rows = np.isin(data["epoch"], [best] if epochs is None else epochs)
            per_run.append(ndcg_per_user(data[split][rows]).mean(axis=0))
    return np.mean(per_run, axis=0)


def test_gap_ratios_and_differences_match_a_hand_computation(gap_runs: dict, tmp_path: Path) -> None:
    png = tmp_path / "gap.png"
    done = report(
        "gap",
        "--top",
        *map(str, gap_runs["top"]),
        "--bottom",
        *map(str, gap_runs["bottom"]),
        "--from-epoch",
        "3",
        "--png",
        str(png),
        "--resamples",
        "200",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 12 and png.stat().st_size > 0
    figures = {(line["metric"], line.get("split"), line["when"]): line for line in lines}
    for when, epochs in (("chosen_epoch", None), ("epochs_3-4", [3, 4])):
        ratio = {}
        for split in ("valid", "test", "test_without_valid"):
            top, bottom = by_hand(gap_runs["top"], split, epochs), by_hand(gap_runs["bottom"], split, epochs)
            ratio[split] = top.mean() / bottom.mean()
            line = figures[("tiny_over_slow_ndcg@10", split, when)]
            assert line["value"] == pytest.approx(ratio[split])
            assert line["ci95"][0] <= line["value"] <= line["ci95"][1]
        for a, b in (("valid", "test"), ("valid", "test_without_valid"), ("test_without_valid", "test")):
            line = figures[(f"tiny_over_slow_ndcg@10_{a}_minus_{b}", None, when)]
            assert line["value"] == pytest.approx(ratio[a] - ratio[b])
        # the interval of one difference, by hand: each resample draws a user with all its events
        top = {k: by_hand(gap_runs["top"], k, epochs) for k in ("valid", "test")}
        bottom = {k: by_hand(gap_runs["bottom"], k, epochs) for k in ("valid", "test")}
        idx = resample_users(top["test"].size, resamples=200, seed=0)
        diffs = top["valid"][idx].mean(1) / bottom["valid"][idx].mean(1) - top["test"][idx].mean(1) / bottom["test"][
            idx
        ].mean(1)
        line = figures[("tiny_over_slow_ndcg@10_valid_minus_test", None, when)]
        assert line["ci95"] == pytest.approx([np.percentile(diffs, 2.5), np.percentile(diffs, 97.5)])
    done = report(
        "gap",
        "--top",
        *map(str, gap_runs["top"]),
        "--bottom",
        *map(str, gap_runs["bottom"]),
        "--from-epoch",
        "2",
        "--to-epoch",
        "3",
        "--png",
        str(png),
        "--resamples",
        "50",
    )
    window = {
        (line["metric"], line.get("split")): line
        for line in map(json.loads, done.stdout.splitlines())
        if line["when"] == "epochs_2-3"
    }
    top, bottom = by_hand(gap_runs["top"], "test", [2, 3]), by_hand(gap_runs["bottom"], "test", [2, 3])
    assert window[("tiny_over_slow_ndcg@10", "test")]["value"] == pytest.approx(top.mean() / bottom.mean())
    per_epoch = [
        by_hand(gap_runs["top"], "test", [e]).mean() / by_hand(gap_runs["bottom"], "test", [e]).mean() for e in (2, 3)
    ]
    assert window[("tiny_over_slow_ndcg@10", "test")]["per_epoch_max"] == pytest.approx(max(per_epoch))
    assert window[("tiny_over_slow_ndcg@10", "test")]["per_epoch_min"] == pytest.approx(min(per_epoch))
    # at the chosen epoch, valid and test are the figures the runs reported themselves
    for side, folders in (("top", gap_runs["top"]), ("bottom", gap_runs["bottom"])):
        reported = [json.loads((f / "metrics.json").read_text()) for f in folders]
        mean_test = np.mean([m["test"]["ndcg@10"] for m in reported])
        line = figures[("tiny_over_slow_ndcg@10", "test", "chosen_epoch")]
        assert line[f"{side}_mean"] == pytest.approx(mean_test)


def test_gap_refuses_runs_without_the_diagnostic_and_a_window_past_the_end(gap_runs: dict, tmp_path: Path) -> None:
    png = str(tmp_path / "x.png")
    top, bottom = list(map(str, gap_runs["top"])), list(map(str, gap_runs["bottom"]))
    for args, reason in (
        (("--top", *top, "--bottom", str(gap_runs["plain"][0])), "trained without train.diagnostic_test_curve=true"),
        (("--top", *top, "--bottom", *bottom, "--from-epoch", "9"), "no evaluation in epochs 9-4 (evaluated: 1-4)"),
        (("--top", top[0], bottom[0], "--bottom", bottom[1]), "mixes models"),
        (("--top", top[0], "--bottom", top[0]), "given twice"),
    ):
        done = report("gap", *args, "--png", png)
        assert done.returncode == 2 and reason in done.stderr, (reason, done.stderr)
    # an npz that is not the run's own, a run trained without the diagnostic, a broken npz
    # (a plain run with a diagnostic npz copied in), a missing npz, an npz without a split
    for name, reason in (
        ("other", "are not the run's own"),
        ("plain", "trained without"),
        ("broken", "not a readable"),
        ("missing", "no diagnostic_ranks.npz"),
        ("incomplete", "missing ['test_without_valid']"),
    ):
        folder = tmp_path / name
        shutil.copytree(gap_runs["plain" if name == "plain" else "bottom"][0], folder)
        npz = folder / "diagnostic_ranks.npz"
        if name in ("other", "plain"):
            shutil.copy(gap_runs["bottom"][1] / "diagnostic_ranks.npz", npz)
        elif name == "broken":
            npz.write_bytes(b"not a zip")
        elif name == "missing":
            npz.unlink()
        else:
            with np.load(npz) as data:
                kept = {k: data[k] for k in data.files if k != "test_without_valid"}
            np.savez(npz, **kept)
        done = report("gap", "--top", *top, "--bottom", str(folder), "--png", png)
        assert done.returncode == 2 and reason in done.stderr, (name, done.stderr)
    # runs of different lengths
    short = tiny_run(
        tmp_path / "short",
        "train.lr=0.002",
        "train.diagnostic_test_curve=true",
        "name=slow",
        "train.epochs=3",
        "train.seed=1",
    )
    done = report("gap", "--top", *top, "--bottom", str(short), "--png", png)
    assert done.returncode == 2 and "evaluated at different epochs" in done.stderr and "epochs 1-3" in done.stderr
    assert not Path(png).exists()


# --- curves -------------------------------------------------------------------------------------


def test_curves_plot_runs_and_print_their_test_ndcg(tmp_path: Path) -> None:
    folders = [
        tiny_run(tmp_path / query_time, "train.epochs=3", f"model.query_time={query_time}")
        for query_time in ("token", "next")
    ]
    png = tmp_path / "plots" / "curves.png"
    done = cli("curves", *map(str, folders), "--png", str(png))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    for line, folder in zip(lines, folders):
        saved = json.loads((folder / "metrics.json").read_text())
        assert line["value"] == saved["test"]["ndcg@10"] and line["metric"] == "test_ndcg@10"
    assert [("query time next" in line["label"]) for line in lines] == [False, True]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_refuse_a_folder_without_metrics(tmp_path: Path) -> None:
    half = metrics_file(tmp_path / "half", config={})
    for folder, reason in ((str(tmp_path), "no metrics.json"), (half, "missing")):
        done = report("curves", folder, "--png", str(tmp_path / "x.png"))
        assert done.returncode == 2 and reason in done.stderr
    assert not (tmp_path / "x.png").exists()


# --- sweep --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep")
    return [
        tiny_run(
            root / f"d{dropout}-s{seed}",
            "name=tiny",
            "train.epochs=2",
            f"model.dropout={dropout}",
            f"train.seed={seed}",
            "train.save_checkpoints=false",
        )
        for dropout in (0.0, 0.3)
        for seed in (1, 2)
    ]


def test_sweep_groups_by_value_and_chooses_on_validation(sweep_runs: list[Path], tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    done = report("sweep", "--key", "model.dropout", "--png", str(png), *map(str, sweep_runs))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    points = {ln["key_value"]: ln for ln in lines if ln["metric"] == "sweep_ndcg@10"}
    assert sorted(points) == [0.0, 0.3]
    for value, folders in ((0.0, sweep_runs[:2]), (0.3, sweep_runs[2:])):
        saved = [json.loads((f / "metrics.json").read_text()) for f in folders]
        assert points[value]["valid_ndcg@10"] == pytest.approx(np.mean([s["best_valid"]["ndcg@10"] for s in saved]))
        assert points[value]["value"] == pytest.approx(np.mean([s["test"]["ndcg@10"] for s in saved]))
        assert points[value]["seeds"] == [1, 2] and points[value]["split"] == "test"
    (chosen,) = [ln for ln in lines if ln["metric"] == "chosen_on_validation"]
    best = max(points, key=lambda v: points[v]["valid_ndcg@10"])  # validation decides, never test
    assert chosen["value"] == best and chosen["test_ndcg@10"] == points[best]["value"]
    assert chosen["values_tried"] == [0.0, 0.3] and chosen["seeds_per_value"] == [2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_refuses_a_repeated_seed_and_a_key_that_is_not_a_number(sweep_runs: list[Path], tmp_path: Path) -> None:
    png = str(tmp_path / "x.png")
    for key, folders, reason in (
        ("model.dropout", [sweep_runs[0]] * 2, "a second run of tiny"),
        ("model.encoder", [sweep_runs[0]], "not a number"),
        ("model.no_such_key", [sweep_runs[0]], "has no 'model.no_such_key'"),
    ):
        done = report("sweep", "--key", key, "--png", png, *map(str, folders))
        assert done.returncode == 2 and reason in done.stderr
    assert not Path(png).exists()


def fake_run(folder: Path, *, name: str, value: float, seed: int, valid: float, test: float) -> str:
    """A finished run's metrics.json, written by hand so validation and test can disagree."""
    return metrics_file(
        folder,
        complete=True,
        dataset="ml-100k",
        best_epoch=3,
        epochs=[],
        config={"name": name, "model": {"dropout": value}, "train": {"seed": seed}},
        best_valid={"ndcg@10": valid},
        test={"ndcg@10": test},
    )


def test_sweep_chooses_on_validation_even_where_test_disagrees(tmp_path: Path) -> None:
    folders = [
        # value 0.2: better on validation; value 0.5: better on test
        fake_run(tmp_path / "a", name="m", value=0.2, seed=1, valid=0.30, test=0.10),
        fake_run(tmp_path / "b", name="m", value=0.2, seed=2, valid=0.28, test=0.12),
        fake_run(tmp_path / "c", name="m", value=0.5, seed=1, valid=0.20, test=0.40),
        fake_run(tmp_path / "d", name="m", value=0.5, seed=2, valid=0.22, test=0.38),
    ]
    done = report("sweep", "--key", "model.dropout", "--png", str(tmp_path / "s.png"), *folders)
    assert done.returncode == 0, done.stderr
    (chosen,) = [json.loads(x) for x in done.stdout.splitlines() if '"chosen_on_validation"' in x]
    assert chosen["value"] == 0.2 and chosen["valid_ndcg@10"] == pytest.approx(0.29)
    assert chosen["test_ndcg@10"] == pytest.approx(0.11)


def test_sweep_refuses_unequal_budgets(tmp_path: Path) -> None:
    base = [
        fake_run(tmp_path / f"m{v}{s}", name="m", value=v, seed=s, valid=0.2, test=0.1)
        for v in (0.2, 0.5)
        for s in (1, 2)
    ]
    # the other model: one seed missing at one value
    other = [
        fake_run(tmp_path / f"o{v}{s}", name="o", value=v, seed=s, valid=0.2, test=0.1)
        for v, s in ((0.2, 1), (0.2, 2), (0.5, 1))
    ]
    done = report("sweep", "--key", "model.dropout", "--png", str(tmp_path / "x.png"), *base, *other)
    assert done.returncode == 2 and "ran the same seeds" in done.stderr
    # the other model: fewer values
    fewer = [fake_run(tmp_path / f"f{s}", name="f", value=0.2, seed=s, valid=0.2, test=0.1) for s in (1, 2)]
    done = report("sweep", "--key", "model.dropout", "--png", str(tmp_path / "x.png"), *base, *fewer)
    assert done.returncode == 2 and "different numbers of model.dropout values" in done.stderr
    assert not (tmp_path / "x.png").exists()
