"""serving/config.py: the shipped Serve config file, app arguments from YAML and the CLI, user_config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from config.loader import ConfigError
from config.paths import REPO_ROOT
from serving.config import FollowConfig, ServingConfig, load_follow_config, load_serving_config

SHIPPED = REPO_ROOT / "serving" / "config.yaml"


def test_the_shipped_serve_config_is_valid() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    ServeDeploySchema.model_validate(raw)  # what `serve run` / `serve deploy` check
    (app,) = raw["applications"]
    assert app["import_path"] == "serving.app:app" and app["route_prefix"] == "/"
    assert load_serving_config(app["args"]) == ServingConfig()  # the file spells out the defaults
    (deployment,) = app["deployments"]
    assert deployment["name"] == "Recommender"
    assert (
        deployment["autoscaling_config"]["min_replicas"] == 1 and deployment["autoscaling_config"]["max_replicas"] == 2
    )
    assert 0 < deployment["ray_actor_options"]["num_cpus"] < 1
    assert load_follow_config(deployment["user_config"]) == FollowConfig(version="latest")


def test_cli_arguments_are_read_as_yaml_scalars_with_dotted_keys() -> None:
    # `serve run serving.app:app registry=/tmp/r limits.max_candidates=50 poll_interval_s=0.5`
    config = load_serving_config(
        {
            "registry": "/tmp/r",
            "limits.max_candidates": "50",
            "poll_interval_s": "0.5",
            "features.online_store": "redis",
        }
    )
    assert config.registry == Path("/tmp/r") and config.limits.max_candidates == 50
    assert config.poll_interval_s == 0.5 and config.features.online_store == "redis"
    assert config.limits.max_body_bytes == 256 * 1024  # untouched defaults stay


def test_relative_paths_are_in_the_checkout() -> None:
    config = load_serving_config({"registry": "runs/registry", "features": {"state_dir": "runs/feast"}})
    assert config.registry_dir == REPO_ROOT / "runs" / "registry"
    assert config.features.state_path == REPO_ROOT / "runs" / "feast"
    assert load_serving_config({"registry": "/abs/r"}).registry_dir == Path("/abs/r")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"limits": {"max_candidate": 5}}, r"unknown key 'limits.max_candidate'"),
        ({"limits.max_candidates": "0"}, r"limits.max_candidates \(0\) must be >= 1"),
        ({"features": {"online_store": "postgres"}}, r"'postgres' is not one of \['sqlite', 'redis'\]"),
        ({"score": {"weights": [1.0, 2.0]}}, r"score.actions \(5 names\) and score.weights \(2 values\)"),
        ({"batching": {"micro_batch": 0}}, r"batching.max_batch_size \(8\) and batching.micro_batch \(0\)"),
        ({"poll_interval_s": 0}, r"poll_interval_s \(0.0\) must be > 0"),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_serving_config(args)


def test_user_config_pins_or_follows() -> None:
    assert load_follow_config(None).pinned is None
    assert load_follow_config({"version": "latest"}).pinned is None
    assert load_follow_config({"version": 7}).pinned == 7
    for bad in ({"version": "newest"}, {"version": True}, {"version": 2.0}, ["latest"]):
        with pytest.raises(ConfigError, match=r"version must be 'latest' or a version number like 7"):
            load_follow_config(bad)
    with pytest.raises(ConfigError, match=r"version \(0\) must be >= 1"):
        load_follow_config({"version": 0})
    with pytest.raises(ConfigError, match=r"unknown key 'versoin'"):
        load_follow_config({"versoin": 3})
