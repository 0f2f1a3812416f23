"""Past one machine, on this one: a two-node Ray cluster (`ray start --head` plus `ray start
--address=...` with its own resources). The stream trainer goes in with `ray job submit` (two
workers, spread), the Serve app with `serve deploy` (two replicas, at most one per node); the
training workers and the replicas land on both nodes, the job succeeds and `/rank` answers
from the version it published."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from config.paths import REPO_ROOT
from features.movielens import movielens_events
from infra.loop import post
from infra.producer import produce_log
from infra.ray_cluster import RAY, LocalCluster, free_port
from streaming.recorded_log import events_to_log
from tests.infra.test_e2e import SMALL
from trainer.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def actors(cluster: LocalCluster, class_name: str) -> list[dict]:
    out = subprocess.run(
        [
            RAY,
            "list",
            "actors",
            f"--address={cluster.address}",
            "--filter",
            f"class_name={class_name}",
            "--format",
            "json",
            "--detail",
            "--limit",
            "1000",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def serve_config(tmp_path: Path, port: int) -> Path:
    """serving/config.yaml for this cluster: two replicas at most one per node, this run's paths."""
    config = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # both nodes share 127.0.0.1: one proxy, one port
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["registry"] = str(tmp_path / "registry")
    app["args"]["features"]["state_dir"] = str(tmp_path / "feast")
    deployment = app["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment.update(num_replicas=2, max_replicas_per_node=1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_loop_on_two_nodes(kafka_bootstrap, new_topic, tmp_path) -> None:
    topic = new_topic(partitions=2, prefix="two-nodes")
    events = movielens_events("ml-100k").iloc[:4_000].reset_index(drop=True)
    produce_log(events_to_log(events, topic=topic, num_partitions=2), kafka_bootstrap, topic, partitions=2)
    cluster = LocalCluster(tmp_path.name, num_cpus=3).start()
    try:
        cluster.add_node(num_cpus=3, resources='{"second_node": 1}')
        job = cluster.submit(
            [
                "--working-dir",
                ".",
                "--",
                "python",
                "trainer/stream_train.py",
                "--source",
                f"kafka://{kafka_bootstrap}/{topic}",
                "--until-idle",
                "--workers",
                "2",
                "train.placement=STRICT_SPREAD",
                *SMALL,
                f"storage_dir={tmp_path / 'run'}",
                f"publish.registry={tmp_path / 'registry'}",
                f"streaming.state_dir={tmp_path / 'job'}",
                f"streaming.feast.state_dir={tmp_path / 'feast'}",
                f"streaming.group_id={topic}",
                f"streaming.dlq_topic={topic}.dlq",
                f"streaming.feed.actor_name=feed-{topic}",
            ],
            cwd=REPO_ROOT,
            timeout_s=600,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout[-3000:], job.stderr[-2000:])
        version = Registry(tmp_path / "registry").load().version
        workers = actors(cluster, "RayTrainWorker")
        assert len({w["node_id"] for w in workers}) == 2, [(w["node_id"], w["state"]) for w in workers]

        port = free_port()
        deploy = subprocess.run(
            [RAY.replace("/ray", "/serve"), "deploy", str(serve_config(tmp_path, port)), "-a", cluster.dashboard],
            cwd=REPO_ROOT,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr[-2000:]
        user = int(events.user_id.iloc[0])
        deadline = time.monotonic() + 240
        status, answer = 0, None
        while time.monotonic() < deadline:
            status, answer, _ = post(f"http://127.0.0.1:{port}/rank", {"user_id": user, "candidates": [1, 50, 100]})
            if status == 200:
                break
            time.sleep(2)
        assert status == 200 and answer["version"] == version and not answer["cold_start"], (status, answer)
        replicas = [a for a in actors(cluster, "ServeReplica:hstu:Recommender") if a["state"] == "ALIVE"]
        assert len({r["node_id"] for r in replicas}) == 2, [(r["node_id"], r["state"]) for r in replicas]
    finally:
        cluster.stop()
