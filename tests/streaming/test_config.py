"""Every shipped job config loads; bad values are refused before any work, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.loader import ConfigError
from streaming.config import CONFIG_DIR, JobConfigError, StreamJobConfig, load_job_config, parse_source


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_job_config(path)
    assert isinstance(cfg, StreamJobConfig)
    assert cfg.source_spec().kind in ("kafka", "log")


def test_sources_parse():
    spec = parse_source("kafka://127.0.0.1:9092/engagements")
    assert (spec.kind, spec.bootstrap, spec.topic) == ("kafka", "127.0.0.1:9092", "engagements")
    assert parse_source("log://a/b.parquet").path == Path("a/b.parquet")


@pytest.mark.parametrize(
    "url, match",
    [
        ("127.0.0.1:9092/engagements", "has no scheme"),
        ("kafka://127.0.0.1/engagements", "kafka://HOST:PORT/TOPIC"),
        ("kafka://127.0.0.1:9092/", "kafka://HOST:PORT/TOPIC"),
        ("log://", "names no file"),
        ("s3://bucket/x", "scheme 's3'"),
    ],
)
def test_bad_sources_are_refused(url, match):
    with pytest.raises(JobConfigError, match=match):
        parse_source(url)


@pytest.mark.parametrize(
    "override, match",
    [
        ("max_len=0", r"max_len \(0\) must be at least 1"),
        ("interval_s=0", r"interval_s \(0.0\) must be > 0"),
        ("feed.max_users=0", r"feed.max_users \(0\)"),
        ("max_batches=0", r"max_batches \(0\)"),
        ("source=nowhere", "has no scheme"),
        ("group_id=a/b", "group_id"),
        ("max_lenn=3", "unknown key 'max_lenn'"),
        ("feast.online_store=mysql", "feast.online_store"),
    ],
)
def test_bad_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_job_config(overrides=[override])
