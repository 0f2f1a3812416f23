"""Serving test fixtures: one real Ray Serve on a free 127.0.0.1 port for the session, and
"worlds" of a model registry (versions published by the real offline trainer, tiny configs), a
real SQLite Feast store holding the users' sequences, and the serving app deployed over them."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from config.loader import load_config, merge
from config.paths import REPO_ROOT
from features.sequence_batch import SequenceBatch
from features.sequences import SequenceStore, SequenceStoreConfig
from serving.config import load_serving_config
from tests.conftest import free_port
from tests.trainer.test_offline_train import TINY, pattern_split
from trainer.offline import OfflineConfig, run_offline
from trainer.registry import Registry

APP = "hstu-test"
# The offline trainer's tiny run, interleaved (serving ranks through action_head); max_candidates
# sizes the full pass (`HSTUModel.rank`) the tests compare with, serving needs none.
TRAIN = [*TINY, "name=tiny", "model.layout=interleaved", "model.max_candidates=16", "train.epochs=1"]
EPOCH_MS = 1_700_000_000_000  # the pattern split's times start at 0: move them to 2023


@pytest.fixture(scope="session")
def serve_url(ray_address: str) -> Iterator[str]:
    """Ray Serve's HTTP proxy on a free port of 127.0.0.1, for the whole session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def request(url: str, method: str, path: str, body: Any = None, *, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or text) of one HTTP request; `raw` sends bytes as they are."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text
    finally:
        conn.close()


def wait_for(check: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class World:
    """A registry, a Feast store and the app serving them (see the module docstring)."""

    root: Path
    url: str
    registry: Registry
    feast_dir: Path
    histories: SequenceBatch
    published: list[int] = field(default_factory=list)

    def publish(self, seed: int = 0, *, into: Registry | None = None) -> int:
        """Train the tiny model with the real offline trainer and publish it (to this world's
        registry, or `into` another); the new version."""
        registry = into if into is not None else self.registry
        config = load_config(OfflineConfig, overrides=[*TRAIN, f"train.seed={seed}", "train.save_checkpoints=false"])
        run_offline(
            config, out_dir=self.root / f"run-{seed}", progress=False, split=pattern_split(), publish=registry.root
        )
        version = registry.latest()
        if into is None:
            self.published.append(version)
        return version

    def args(self, **args: Any) -> dict[str, Any]:
        """The app's arguments: this world's registry and store, fast polling, and `args`."""
        base = {
            "registry": str(self.registry.root),
            "poll_interval_s": 0.2,
            "features": {"state_dir": str(self.feast_dir)},
        }
        return merge(base, args)

    def deploy(self, **args: Any) -> None:
        """Deploy the app as `serve run serving.app:app key=value ...` does (the `app` builder),
        one replica."""
        from ray import serve

        from serving.app import app

        serve.run(app(self.args(**args)), name=APP, route_prefix="/")

    def declare(self, *, user_config: Any = None, **args: Any) -> None:
        """Deploy serving/config.yaml's application with this world's arguments the way
        `serve deploy` does: declaratively, so a change of user_config alone reconfigures the
        running replica in place. One replica (autoscaling off)."""
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        raw = yaml.safe_load((REPO_ROOT / "serving" / "config.yaml").read_text())
        (app,) = raw["applications"]
        app["name"] = APP
        app["args"] = merge(app["args"], self.args(**args))
        load_serving_config(app["args"])  # fail here, with the key, rather than in the controller
        (deployment,) = app["deployments"]
        deployment.pop("autoscaling_config")
        deployment["num_replicas"] = 1
        deployment["user_config"] = user_config if user_config is not None else {"version": "latest"}
        schema = ServeDeploySchema.model_validate({"applications": [app]})
        serve.context._get_global_client().deploy_apps(schema, _blocking=True)

    def get(self, path: str):
        return request(self.url, "GET", path)

    def post(self, path: str, body: Any = None, **kwargs):
        return request(self.url, "POST", path, body, **kwargs)

    def serving_version(self) -> int | None:
        status, body = self.get("/version")
        return body["version"] if status == 200 else None


def stored_histories() -> SequenceBatch:
    """The pattern split's test histories (users 0..63, 13 events), in 2023, with watermarks."""
    history = pattern_split().test.history
    users = len(history)
    return replace(
        history,
        timestamps_ms=history.timestamps_ms + EPOCH_MS,
        last_partition=np.zeros(users, dtype=np.int64),
        last_offset=np.arange(users, dtype=np.int64) * 100 + 13,
    )


def make_world(root: Path, url: str) -> World:
    root.mkdir(parents=True, exist_ok=True)
    feast_dir = root / "feast"
    histories = stored_histories()
    store = SequenceStore(SequenceStoreConfig(max_len=200, state_dir=feast_dir))
    store.write_many(histories)
    store.close()
    return World(root=root, url=url, registry=Registry(root / "registry"), feast_dir=feast_dir, histories=histories)


@pytest.fixture
def world(tmp_path: Path, serve_url: str) -> Iterator[World]:
    """A fresh world with version 1 published and the app deployed over it (`World.deploy`)."""
    yield from _served(make_world(tmp_path, serve_url), declare=False)


@pytest.fixture
def declared_world(tmp_path: Path, serve_url: str) -> Iterator[World]:
    """The same, deployed from serving/config.yaml the declarative way (`World.declare`)."""
    yield from _served(make_world(tmp_path, serve_url), declare=True)


def _served(world: World, *, declare: bool) -> Iterator[World]:
    from ray import serve

    world.publish(seed=0)
    if declare:
        world.declare()
    else:
        world.deploy()
    try:
        yield world
    finally:
        serve.delete(APP)
