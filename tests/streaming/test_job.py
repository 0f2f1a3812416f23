"""The CLI maps its flags onto the config, refuses bad settings before any work (exit 2), and
parses crash points. (The CLI's runs against the broker are in test_pipeline.py.)"""

from __future__ import annotations

import pytest

from streaming.job import main, parse_args
from streaming.pipeline import CRASH_POINTS, CrashPlan, CrashPlanError


def test_flags_become_overrides():
    args, overrides = parse_args(
        [
            "--source",
            "log://x.parquet",
            "--interval",
            "0.5",
            "--batch-size",
            "1000",
            "--max-len",
            "64",
            "--until-idle",
            "feast.online_store=redis",
        ]
    )
    assert overrides == [
        "source=log://x.parquet",
        "interval_s=0.5",
        "max_batch_events=1000",
        "max_len=64",
        "stop_when_idle=true",
        "feast.online_store=redis",
    ]
    assert args.crash_at is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-len", "0"], "max_len (0) must be at least 1"),
        (["--source", "ftp://x"], "scheme 'ftp'"),
        (["nonsense=1"], "unknown key 'nonsense'"),
        (["--crash-at", "after_lunch"], "crash point 'after_lunch' is not one of"),
    ],
)
def test_bad_settings_exit_2_with_the_reason(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_crash_plans():
    assert CrashPlan.parse("after_feast_write") == CrashPlan("after_feast_write", 1)
    assert CrashPlan.parse("during_commit@3") == CrashPlan("during_commit", 3)
    assert "mid_feast_write" in CRASH_POINTS
    with pytest.raises(CrashPlanError, match="must be a positive integer"):
        CrashPlan.parse("after_read@0")
