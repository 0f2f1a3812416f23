"""benchmarks/quality.py: the multi-seed summary (means, sds, paired ratios) on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import quality


def _res(ndcg: float) -> dict:
    return {"test": {"ndcg@10": ndcg}}


def test_summary_over_seeds_gives_means_sds_and_paired_ratios():
    results = {
        ("ml-100k", "hstu", 1): _res(0.12),
        ("ml-100k", "sasrec", 1): _res(0.10),
        ("ml-100k", "hstu", 2): _res(0.09),
        ("ml-100k", "sasrec", 2): _res(0.10),
    }
    lines = quality.summary_lines(results, datasets=["ml-100k"], models=["hstu", "sasrec"], seeds=[1, 2], epochs=5)
    by = {(ln["metric"], ln.get("model")): ln for ln in lines}
    hstu = by[("test_ndcg@10_mean", "hstu")]
    assert hstu["value"] == pytest.approx(0.105)
    assert hstu["sd"] == pytest.approx(0.0212132, rel=1e-5)  # sample sd of (0.12, 0.09)
    assert hstu["per_seed"] == [0.12, 0.09] and hstu["n_seeds"] == 2
    assert by[("test_ndcg@10_mean", "sasrec")]["sd"] == pytest.approx(0.0)
    ratio = by[("hstu_over_sasrec_ndcg@10", None)]
    assert ratio["value"] == pytest.approx(0.105 / 0.10)  # ratio of the means
    assert ratio["per_seed"] == pytest.approx([1.2, 0.9])  # paired by seed
    assert ratio["per_seed_mean"] == pytest.approx(1.05)
    assert ratio["per_seed_sd"] == pytest.approx(0.2121320, rel=1e-5)
    assert ratio["target"] == ">= 1.10"
    assert ("hstu_large_over_hstu_ndcg@10", None) not in by  # HSTU-large was not run


def test_single_run_summary_has_only_the_ratios():
    results = {
        ("ml-1m-subset", "hstu", None): _res(0.2),
        ("ml-1m-subset", "hstu-large", None): _res(0.18),
    }
    lines = quality.summary_lines(
        results, datasets=["ml-1m-subset"], models=["hstu", "hstu-large"], seeds=[None], epochs=101
    )
    assert [ln["metric"] for ln in lines] == ["hstu_large_over_hstu_ndcg@10"]
    assert lines[0]["value"] == pytest.approx(0.9)
    assert "per_seed" not in lines[0]


def test_repeated_seeds_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--seeds", "1", "1", "--out", str(tmp_path / "never-created")])
    assert exc.value.code == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert not (tmp_path / "never-created").exists()  # refused before anything is written


def test_ratio_lines_carry_the_users_interval_when_runs_have_ranks():
    """With per-user ranks in every run, each ratio line gets its paired bootstrap interval over users."""

    def run(test_ranks, valid_ranks):
        ndcg = float(np.where(np.array(test_ranks) < 10, 1 / np.log2(np.array(test_ranks) + 2.0), 0).mean())
        return {"test": {"ndcg@10": ndcg}, "ranks_at_best_epoch": {"test": test_ranks, "valid": valid_ranks}}

    hstu = [0, 1, 3, 20, 0, 2, 50, 4] * 25  # 200 users
    hstu2 = [0, 0, 2, 20, 0, 1, 50, 3] * 25  # seed 2: better still
    sasrec = [1, 1, 5, 20, 2, 2, 50, 9] * 25
    results = {
        ("ml-100k", "hstu", 1): run(hstu, sasrec),
        ("ml-100k", "sasrec", 1): run(sasrec, hstu),
        ("ml-100k", "hstu", 2): run(hstu2, sasrec),
        ("ml-100k", "sasrec", 2): run(sasrec, hstu),
    }
    lines = quality.summary_lines(results, datasets=["ml-100k"], models=["hstu", "sasrec"], seeds=[1, 2], epochs=5)
    ratio = next(ln for ln in lines if ln["metric"] == "hstu_over_sasrec_ndcg@10")
    # each user's NDCG@10 is averaged over both seeds: the ratio is that of the seed means
    hstu_mean = (
        results[("ml-100k", "hstu", 1)]["test"]["ndcg@10"] + results[("ml-100k", "hstu", 2)]["test"]["ndcg@10"]
    ) / 2
    assert ratio["value"] == pytest.approx(hstu_mean / results[("ml-100k", "sasrec", 1)]["test"]["ndcg@10"])
    assert ratio["test_users_ci95"][0] < ratio["value"] < ratio["test_users_ci95"][1]
    low, high = ratio["test_users_ci95"]
    assert low < ratio["value"] < high and ratio["users"] == 200
    assert low > 1.0 and ratio["test_users_p_le_1"] == 0.0  # HSTU ranks every user at least as well
    sasrec_valid = run(hstu, sasrec)["test"]["ndcg@10"]  # SASRec's validation ranks are HSTU's seed-1 test ranks
    assert ratio["valid_ratio"] == pytest.approx(run(sasrec, hstu)["test"]["ndcg@10"] / sasrec_valid)
    assert ratio["valid_users_ci95"][1] < 1.0
    # a run without ranks (older metrics.json): no interval, the ratio still printed
    del results[("ml-100k", "hstu", 2)]["ranks_at_best_epoch"]
    lines = quality.summary_lines(results, datasets=["ml-100k"], models=["hstu", "sasrec"], seeds=[1, 2], epochs=5)
    ratio = next(ln for ln in lines if ln["metric"] == "hstu_over_sasrec_ndcg@10")
    assert "test_users_ci95" not in ratio and ratio["value"] > 1.0
