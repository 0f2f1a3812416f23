"""benchmarks/quality.py: the multi-seed summary (means, sds, paired ratios) on hand-computed cases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality.py as a module (benchmarks/ holds scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_quality", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _res(ndcg: float) -> dict:
    return {"test": {"ndcg@10": ndcg}}


def test_summary_over_seeds_gives_means_sds_and_paired_ratios(quality):
    results = {
        ("ml-100k", "hstu", 1): _res(0.12), ("ml-100k", "sasrec", 1): _res(0.10),
        ("ml-100k", "hstu", 2): _res(0.09), ("ml-100k", "sasrec", 2): _res(0.10),
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


def test_single_run_summary_has_only_the_ratios(quality):
    results = {
        ("ml-1m-subset", "hstu", None): _res(0.2), ("ml-1m-subset", "hstu-large", None): _res(0.18),
    }
    lines = quality.summary_lines(
        results, datasets=["ml-1m-subset"], models=["hstu", "hstu-large"], seeds=[None], epochs=101
    )
    assert [ln["metric"] for ln in lines] == ["hstu_large_over_hstu_ndcg@10"]
    assert lines[0]["value"] == pytest.approx(0.9)
    assert "per_seed" not in lines[0]


def test_repeated_seeds_are_refused(quality, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--seeds", "1", "1", "--out", str(tmp_path / "never-created")])
    assert exc.value.code == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert not (tmp_path / "never-created").exists()  # refused before anything is written
