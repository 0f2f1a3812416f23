"""Hot-swap of model versions (serving/versions.py) over real HTTP: no failed request under load
across publishes, corrupted versions refused while the old one answers, pin and roll back
through `reconfigure`."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.serving.conftest import World, wait_for
from trainer.registry import MANIFEST_FILE, MODEL_FILE, Registry, sha256_of

CLIENTS = 20
PUBLISHES = 5


def rank_loop(world: World, seed: int, stop: threading.Event, out: list) -> None:
    """One closed-loop client on a keep-alive connection: (status, version or error) per request."""
    host, port = world.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        body = {"user_id": int(rng.integers(0, 70)), "candidates": rng.integers(1, 40, 8).tolist()}
        try:
            conn.request("POST", "/rank", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            out.append((response.status, json.loads(data)["version"] if response.status == 200 else data[:200]))
        except (OSError, http.client.HTTPException) as error:  # a dropped connection is a failure too
            out.append((None, repr(error)))
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.close()


def test_hot_swap_under_load_fails_no_request(world: World) -> None:
    stop = threading.Event()
    answers: list[list] = [[] for _ in range(CLIENTS)]
    clients = [threading.Thread(target=rank_loop, args=(world, i, stop, answers[i])) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(1.0)
        for seed in range(1, PUBLISHES + 1):
            version = world.publish(seed=seed)  # the real offline trainer, while the clients run
            wait_for(lambda v=version: world.serving_version() == v, what=f"version {version} to be served")
            time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=60)
    existed = set(world.published)
    assert len(existed) == PUBLISHES + 1
    failures = [answer for client in answers for answer in client if answer[0] != 200]
    assert failures == [], failures[:5]
    seen = set()
    for client in answers:
        versions = [version for _, version in client]
        assert len(versions) >= 10, "each client keeps a steady load"
        assert set(versions) <= existed
        assert versions == sorted(versions), "versions go forward for every client"
        seen |= set(versions)
    assert seen == existed, f"every publish was answered with (saw {sorted(seen)})"
    status = world.get("/version")[1]
    assert status["version"] == world.published[-1] and status["swaps"] == PUBLISHES + 1 and status["refused"] == {}


def publish_broken(world: World, seed: int, damage: Callable[[Path], None]) -> int:
    """Publish a trained version the way a broken writer would: made aside, damaged, moved in,
    then LATEST pointed at it (so the watcher never sees it intact)."""
    staging = Registry(world.root / f"staging-{seed}")
    next_version = max(world.registry.versions()) + 1
    for earlier in range(1, next_version):
        (staging.root / f"v{earlier}").mkdir(parents=True)  # numbering: the next publish is next_version
    world.publish(seed=seed, into=staging)
    folder = staging.path_of(next_version)
    damage(folder)
    os.rename(folder, world.registry.path_of(next_version))
    latest = world.registry.root / "LATEST"
    tmp = latest.with_suffix(".tmp")
    tmp.write_text(f"v{next_version}\n")
    os.replace(tmp, latest)
    return next_version


def truncate_weights(folder: Path) -> None:
    path = folder / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_weights_and_checksum(folder: Path) -> None:
    """Truncated weights whose manifest checksum matches: the load itself must catch it."""
    truncate_weights(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][MODEL_FILE] = sha256_of(folder / MODEL_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def wrong_checksum(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"]["config.json"] = "0" * 64
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def nan_weights(folder: Path) -> None:
    """Weights that load and verify but score NaN (a diverged run), checksums rewritten to match."""
    from safetensors.torch import load_file

    state = load_file(str(folder / MODEL_FILE))
    state["action_head.weight"] = torch.full_like(state["action_head.weight"], float("nan"))
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "1"})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][MODEL_FILE] = sha256_of(folder / MODEL_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


DAMAGES = [
    (truncate_weights, "sha256"),
    (truncate_weights_and_checksum, "weights do not load"),
    (wrong_checksum, "sha256"),
    (nan_weights, "non-finite"),
]


def test_corrupted_versions_are_refused_and_the_old_one_answers(world: World) -> None:
    for seed, (damage, reason) in enumerate(DAMAGES, start=7):
        bad = publish_broken(world, seed=seed, damage=damage)
        refused = wait_for(
            lambda b=bad: world.get("/version")[1]["refused"].get(str(b)), what=f"version {bad} to be refused"
        )
        assert reason in refused, (damage.__name__, refused)
        for user_id in (1, 2, 100_000):
            status, body = world.post("/rank", {"user_id": user_id, "candidates": [1, 2, 3]})
            assert status == 200 and body["version"] == 1, (damage.__name__, body)
        assert world.get("/healthz") == (200, {"status": "ok", "version": 1})
    time.sleep(0.6)  # a few polls: a refused version is not tried again
    status = world.get("/version")[1]
    assert status["swaps"] == 1 and len(status["refused"]) == len(DAMAGES)
    good = world.publish(seed=20)  # the next good version is taken as usual
    wait_for(lambda: world.serving_version() == good, what=f"version {good}")


def test_pin_and_roll_back_through_reconfigure(declared_world: World) -> None:
    world = declared_world
    v2 = world.publish(seed=1)
    wait_for(lambda: world.serving_version() == v2, what="version 2")
    world.declare(user_config={"version": 1})  # roll back: reconfigure on the running replica
    status = wait_for(lambda: (s := world.get("/version")[1])["version"] == 1 and s, what="the pin to version 1")
    assert status["following"] == 1
    assert status["swaps"] == 3, "the same replica swapped (1, 2, then back to 1): reconfigured in place"
    assert world.post("/rank", {"user_id": 3, "candidates": [1, 2]})[1]["version"] == 1
    v3 = world.publish(seed=2)
    time.sleep(1.0)  # five polls: a pinned replica does not follow LATEST
    assert world.serving_version() == 1
    world.declare(user_config={"version": 99})  # a version that does not exist: refused, the pin stays put
    status = world.get("/version")[1]
    assert status["version"] == 1 and "does not exist" in status["refused"]["99"]
    assert world.post("/rank", {"user_id": 3, "candidates": [1, 2]})[0] == 200
    world.declare(user_config={"version": "latest"})
    wait_for(lambda: world.serving_version() == v3, what="following the registry again")
    assert world.get("/version")[1]["following"] == "latest"
