"""serving/versions.py in-process, against a real registry: what a replica will and will not
serve, and the watcher's swap, pin and refusal rules (tests/serving/test_swap.py does the same
over HTTP under load)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from serving.config import FollowConfig, ScoreConfig
from serving.versions import ServedVersion, VersionRefused, VersionWatcher
from trainer.model import ModelConfig, build_model
from trainer.registry import MODEL_FILE, Registry

SMALL = dict(dim=8, qk_dim=4, v_dim=4, max_seq_len=10, num_time_buckets=8)


def model(**kw):
    torch.manual_seed(0)
    built = build_model(ModelConfig(**{**SMALL, **kw}), capacity=20)
    built.table.observe(torch.tensor([1, 2, 2, 3, 3, 3]), now=0.0)  # counts 1, 2, 3
    return built


def test_prepare_precomputes_popularity_and_item_embeddings(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.publish(model(layout="interleaved"))
    served = ServedVersion.prepare(registry.load(), score=ScoreConfig())
    assert served.version == 1 and served.max_events == 10
    assert served.popular_ids.tolist() == [3, 2, 1]
    assert served.popularity(torch.tensor([3, 99, 1]).numpy()).tolist() == [3.0, 0.0, 1.0]
    assert torch.equal(served.item_embeddings, served.model.item_embeddings())


@pytest.mark.parametrize(
    "kw, score, reason",
    [
        (dict(layout="items"), ScoreConfig(), "interleaved layout"),
        (dict(layout="interleaved", num_actions=3), ScoreConfig(), "predicts 3 actions, score.actions names 5"),
        (dict(layout="interleaved", normalize_by_length=True), ScoreConfig(), "normalize_by_length false"),
        (
            dict(layout="interleaved", num_actions=2),
            ScoreConfig(actions=("skip", "click"), weights=(0.0, 1.0)),
            None,
        ),
    ],
)
def test_prepare_refuses_what_serving_cannot_run(tmp_path: Path, kw: dict, score: ScoreConfig, reason) -> None:
    registry = Registry(tmp_path)
    registry.publish(model(**kw))
    if reason is None:
        assert ServedVersion.prepare(registry.load(), score=score).actions == ("skip", "click")
        return
    with pytest.raises(VersionRefused, match=reason):
        ServedVersion.prepare(registry.load(), score=score)


def test_watcher_swaps_pins_and_refuses(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    watcher = VersionWatcher(registry=registry, score=ScoreConfig(), poll_interval_s=0.05)
    watcher.start()
    try:
        assert watcher.current is None and watcher.alive
        registry.publish(model(layout="interleaved"))
        deadline = time.monotonic() + 30
        while watcher.current is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first = watcher.current
        assert first.version == 1 and watcher.swaps == 1
        registry.publish(model(layout="interleaved"))
        (registry.path_of(2) / MODEL_FILE).write_bytes(b"truncated")  # corrupted after publishing
        assert watcher.poll() is first  # refused, the old version answers
        assert "sha256" in watcher.refused[2] and watcher.last_error == watcher.refused[2]
        calls = watcher.swaps
        assert watcher.poll() is first and watcher.swaps == calls  # not tried again
        registry.publish(model(layout="interleaved"))
        assert watcher.poll().version == 3
        watcher.set_follow(FollowConfig(version=1))  # roll back
        assert watcher.current.version == 1 and watcher.status()["following"] == 1
        registry.publish(model(layout="interleaved"))
        time.sleep(0.2)
        assert watcher.current.version == 1  # pinned: LATEST (4) is not followed
        watcher.set_follow(FollowConfig(version=2))  # pinning a refused version tries it again, and refuses
        assert watcher.current.version == 1 and "sha256" in watcher.refused[2]
        watcher.set_follow(FollowConfig())
        assert watcher.current.version == 4
        status = watcher.status()
        assert status["version"] == 4 and status["following"] == "latest" and list(status["refused"]) == ["2"]
        assert status["created_ms"] == registry.manifest(4).created_ms and status["swaps"] == 4  # 1, 3, 1, 4
    finally:
        watcher.stop()
    assert not watcher.alive


def test_replicas_activate_a_version_at_the_same_moment(tmp_path: Path) -> None:
    """Two watchers (two replicas) that load a version at different times both answer with it from
    its created_ms + activate_delay_s, not before; so a client never sees the versions go back."""
    registry = Registry(tmp_path)
    registry.publish(model(layout="interleaved"))
    delay = 1.5
    early = VersionWatcher(registry=registry, score=ScoreConfig(), poll_interval_s=60, activate_delay_s=delay)
    late = VersionWatcher(registry=registry, score=ScoreConfig(), poll_interval_s=60, activate_delay_s=delay)
    early.start()  # waits for version 1's moment before it takes traffic (returns from start)
    due = registry.manifest(1).created_ms / 1000 + delay
    assert early.current.version == 1 and time.time() >= due - 0.01
    registry.publish(model(layout="interleaved"))
    due = registry.manifest(2).created_ms / 1000 + delay
    answering = []
    thread = threading.Thread(target=lambda: answering.append(early.poll().version))
    thread.start()
    time.sleep(0.3)
    assert early.current.version == 1 and time.time() < due  # loaded, not yet answering
    thread.join()
    assert answering == [2] and time.time() >= due - 0.01
    late.poll()  # loads after the moment: answers at once
    assert late.current.version == 2 and time.time() < due + 1.0
    registry.publish(model(layout="interleaved"))
    early.set_follow(FollowConfig(version=3))  # a pin (rollback) answers at once
    assert early.current.version == 3 and time.time() < registry.manifest(3).created_ms / 1000 + delay
    early.stop()
