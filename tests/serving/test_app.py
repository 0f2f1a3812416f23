"""serving/app.py over real HTTP against real Ray Serve, a real SQLite Feast store and a version
the real offline trainer published: agreement with the model called directly, cold start, OOV,
recent events, the encoded-history cache, health, version, docs, and every bad input's 4xx."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from features.sequences import SequenceStore, SequenceStoreConfig
from serving.features import merge_recent
from tests.serving.conftest import APP, World, make_world, request
from trainer.registry import Registry

MAX_CANDIDATES = 40  # small limits, so the oversized cases stay small
MAX_BODY = 16 * 1024
WEIGHTS = np.arange(1.0, 6.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_url: str) -> Iterator[World]:
    from ray import serve

    world = make_world(tmp_path_factory.mktemp("serving"), serve_url)
    world.publish(seed=0)
    world.deploy(limits={"max_candidates": MAX_CANDIDATES, "max_body_bytes": MAX_BODY, "max_k": 20})
    try:
        yield world
    finally:
        serve.delete(APP)


def direct(world: World, user_id: int, recent=None):
    """The model, the stored (and merged) history of a user, read without the app."""
    loaded = Registry(world.registry.root).load()
    store = SequenceStore(SequenceStoreConfig(max_len=200, state_dir=world.feast_dir))
    seq = store.read_many(np.array([user_id], dtype=np.int64)).sequence(0)
    events = merge_recent(
        seq.item_ids, seq.actions, seq.timestamps_ms, recent=recent, max_events=loaded.model.config.max_seq_len
    )
    return loaded, [torch.from_numpy(a) for a in events]


def test_rank_agrees_with_the_model_called_directly(served: World) -> None:
    candidates = [1, 5, 9, 14, 22, 30, 777_777, 3]  # 777777 is not in the catalogue
    for user_id in (0, 17, 63):
        loaded, (items, actions, ts) = direct(served, user_id)
        when = int(ts[-1]) + 60_000
        status, body = served.post("/rank", {"user_id": user_id, "candidates": candidates, "request_ts_ms": when})
        assert status == 200, body
        assert body["version"] == 1 and not body["cold_start"] and body["history_events"] == len(items) == 12
        assert body["actions"] == ["rate_1", "rate_2", "rate_3", "rate_4", "rate_5"]
        logits = loaded.model.rank(
            item_ids=items,
            actions=actions,
            timestamps_ms=ts,
            candidate_ids=torch.tensor(candidates),
            candidate_timestamps_ms=torch.full((len(candidates),), when),
            request_timestamps_ms=torch.tensor([when]),
        )
        probs = torch.softmax(logits, -1).numpy()
        scores = probs @ WEIGHTS
        expected = np.argsort(-scores, kind="stable")
        assert [item["item_id"] for item in body["items"]] == [candidates[i] for i in expected]
        got = {item["item_id"]: item for item in body["items"]}
        for i, item_id in enumerate(candidates):
            assert got[item_id]["score"] == pytest.approx(scores[i], abs=1e-5)
            assert np.allclose(got[item_id]["probabilities"], probs[i], atol=1e-5)
            assert got[item_id]["oov"] == (item_id == 777_777)


def test_retrieve_agrees_with_the_model_called_directly(served: World) -> None:
    for user_id, exclude_seen in ((2, True), (40, False)):
        loaded, (items, actions, ts) = direct(served, user_id)
        when = int(ts[-1]) + 60_000
        status, body = served.post(
            "/retrieve", {"user_id": user_id, "k": 10, "exclude_seen": exclude_seen, "request_ts_ms": when}
        )
        assert status == 200, body
        top, scores = loaded.model.retrieve(
            item_ids=items,
            actions=actions,
            timestamps_ms=ts,
            k=10,
            exclude_seen=exclude_seen,
            request_timestamps_ms=torch.tensor([when]),
        )
        assert [item["item_id"] for item in body["items"]] == top[0].tolist()
        assert np.allclose([item["score"] for item in body["items"]], scores[0].numpy(), atol=1e-5)
        if exclude_seen:
            assert not set(top[0].tolist()) & set(items.tolist())


def test_recent_events_are_merged_into_the_stored_sequence(served: World) -> None:
    user_id = 5
    _, (items, actions, ts) = direct(served, user_id)
    last = int(ts[-1])
    events = [
        {"item_id": int(items[-1]), "action": int(actions[-1]), "ts_ms": last},  # already stored: not added twice
        {"item_id": 21, "action": "rate_4", "ts_ms": last + 1000},
        {"item_id": 22, "action": 1, "ts_ms": last + 2000},
    ]
    recent = (
        np.array([int(items[-1]), 21, 22]),
        np.array([int(actions[-1]), 3, 1]),
        np.array([last, last + 1000, last + 2000]),
    )
    loaded, (m_items, m_actions, m_ts) = direct(served, user_id, recent=recent)
    assert m_items[-2:].tolist() == [21, 22] and len(m_items) == 12
    when = last + 60_000
    status, body = served.post(
        "/rank", {"user_id": user_id, "candidates": [7, 8, 9], "recent_events": events, "request_ts_ms": when}
    )
    assert status == 200, body
    logits = loaded.model.rank(
        item_ids=m_items,
        actions=m_actions,
        timestamps_ms=m_ts,
        candidate_ids=torch.tensor([7, 8, 9]),
        candidate_timestamps_ms=torch.full((3,), when),
        request_timestamps_ms=torch.tensor([when]),
    )
    scores = torch.softmax(logits, -1).numpy() @ WEIGHTS
    got = {item["item_id"]: item["score"] for item in body["items"]}
    assert [got[i] for i in (7, 8, 9)] == pytest.approx(scores.tolist(), abs=1e-5)
    # recent events alone make a user known: no cold start
    status, body = served.post(
        "/retrieve", {"user_id": 9_999, "k": 3, "recent_events": events[1:], "request_ts_ms": when}
    )
    assert status == 200 and not body["cold_start"] and body["history_events"] == 2


def test_unknown_user_gets_flagged_popularity(served: World) -> None:
    vocabulary = Registry(served.registry.root).load().vocabulary
    counts = dict(zip(vocabulary["raw_ids"].tolist(), vocabulary["counts"].tolist()))
    candidates = [3, 777_777, 11, 25]
    status, body = served.post("/rank", {"user_id": 123_456, "candidates": candidates, "top_k": 3})
    assert status == 200, body
    assert body["cold_start"] and body["history_events"] == 0 and body["score"].startswith("popularity")
    expected = sorted(candidates, key=lambda i: -counts.get(i, 0.0))[:3]
    assert [item["item_id"] for item in body["items"]] == expected
    assert all(item["probabilities"] is None for item in body["items"])
    total = sum(counts.values())
    assert body["items"][0]["score"] == pytest.approx(counts[expected[0]] / total)
    status, body = served.post("/retrieve", {"user_id": 123_456, "k": 5})
    assert status == 200 and body["cold_start"]
    assert [item["item_id"] for item in body["items"]] == sorted(counts, key=lambda i: (-counts[i], i))[:5]


def test_encoded_histories_are_cached_per_version_and_sequence(served: World) -> None:
    first = served.post("/rank", {"user_id": 33, "candidates": [1, 2]})[1]
    again = served.post("/rank", {"user_id": 33, "candidates": [4, 5, 6]})[1]
    assert first["timings_ms"]["encode"] > 0 and again["timings_ms"]["encode"] == 0  # a hit
    moved = served.post(
        "/rank",
        {"user_id": 33, "candidates": [4], "recent_events": [{"item_id": 4, "action": 0, "ts_ms": 1_800_000_000_000}]},
    )[1]
    assert moved["timings_ms"]["encode"] > 0  # another history: a miss
    for stage in ("queue", "features", "encode", "score", "replica"):
        assert first["timings_ms"][stage] >= 0


def test_health_version_and_docs(served: World) -> None:
    assert served.get("/healthz") == (200, {"status": "ok", "version": 1})
    status, body = served.get("/version")
    manifest = Registry(served.registry.root).manifest(1)
    assert status == 200 and body["version"] == 1 and body["created_ms"] == manifest.created_ms
    assert body["offsets"] == {} and body["following"] == "latest" and body["refused"] == {}
    assert body["metrics"]["best_epoch"] == 1
    status, schema = served.get("/openapi.json")
    assert status == 200 and {"/rank", "/retrieve", "/healthz", "/version"} <= set(schema["paths"])
    status, page = served.get("/docs")
    assert status == 200 and "swagger" in page.lower()


BAD_RANK = {
    "malformed JSON": (b'{"user_id": 1, "candidates": [1,', 422),
    "user id a string": ({"user_id": "1", "candidates": [1]}, 422),
    "user id a float": ({"user_id": 1.0, "candidates": [1]}, 422),
    "candidates not a list": ({"user_id": 1, "candidates": "1,2"}, 422),
    "candidate a string": ({"user_id": 1, "candidates": [1, "2"]}, 422),
    "top_k a float": ({"user_id": 1, "candidates": [1], "top_k": 1.5}, 422),
    "top_k zero": ({"user_id": 1, "candidates": [1], "top_k": 0}, 422),
    "body not an object": ([1, 2], 422),
    "missing candidates": ({"user_id": 1}, 422),
    "empty candidates": ({"user_id": 1, "candidates": []}, 422),
    "too many candidates": ({"user_id": 1, "candidates": list(range(MAX_CANDIDATES + 1))}, 422),
    "negative user id": ({"user_id": -1, "candidates": [1]}, 422),
    "user id past int64": ({"user_id": 2**63, "candidates": [1]}, 422),
    "negative item id": ({"user_id": 1, "candidates": [1, -5]}, 422),
    "item id past the table's range": ({"user_id": 1, "candidates": [2**63 - 1]}, 422),
    "unknown field": ({"user_id": 1, "candidates": [1], "candidate_ids": [2]}, 422),
    "unknown event field": (
        {"user_id": 1, "candidates": [1], "recent_events": [{"item_id": 1, "action": 0, "ts_ms": 1, "x": 1}]},
        422,
    ),
    "unknown action name": (
        {"user_id": 1, "candidates": [1], "recent_events": [{"item_id": 1, "action": "like", "ts_ms": 1}]},
        422,
    ),
    "action code out of range": (
        {"user_id": 1, "candidates": [1], "recent_events": [{"item_id": 1, "action": 5, "ts_ms": 1}]},
        422,
    ),
    "negative event time": (
        {"user_id": 1, "candidates": [1], "recent_events": [{"item_id": 1, "action": 0, "ts_ms": -1}]},
        422,
    ),
    # a history spanning more than the time bias can measure (2^30 s): the model refuses, 422
    "history spanning 60 years": (
        {"user_id": 1, "candidates": [1], "recent_events": [{"item_id": 1, "action": 0, "ts_ms": 3_600_000_000_000}]},
        422,
    ),
    "oversized body": ({"user_id": 1, "candidates": [1] * 8000}, 413),
}
BAD_RETRIEVE = {
    "k missing": ({"user_id": 1}, 422),
    "k zero": ({"user_id": 1, "k": 0}, 422),
    "k over the limit": ({"user_id": 1, "k": 21}, 422),
    "k a string": ({"user_id": 1, "k": "5"}, 422),
    "exclude_seen a string": ({"user_id": 1, "k": 5, "exclude_seen": "yes"}, 422),
    "unknown field": ({"user_id": 1, "k": 5, "candidates": [1]}, 422),
}


@pytest.mark.parametrize("path, case", [("/rank", c) for c in BAD_RANK] + [("/retrieve", c) for c in BAD_RETRIEVE])
def test_bad_input_gets_a_4xx_with_the_reason(served: World, path: str, case: str) -> None:
    body, expected = (BAD_RANK if path == "/rank" else BAD_RETRIEVE)[case]
    raw = body if isinstance(body, bytes) else None
    status, answer = served.post(path, None if raw else body, raw=raw)
    assert status == expected, (case, status, answer)
    assert answer["detail"], answer  # a reason
    assert served.post("/rank", {"user_id": 1, "candidates": [1, 2]})[0] == 200  # the replica still answers


def test_bad_input_reasons_name_the_problem(served: World) -> None:
    _, answer = served.post("/rank", BAD_RANK["too many candidates"][0])
    assert f"limit is {MAX_CANDIDATES} (limits.max_candidates)" in answer["detail"]
    _, answer = served.post("/rank", BAD_RANK["unknown field"][0])
    assert answer["detail"][0]["loc"] == ["body", "candidate_ids"] and answer["detail"][0]["type"] == "extra_forbidden"
    _, answer = served.post("/rank", BAD_RANK["oversized body"][0])
    assert f"the limit is {MAX_BODY} (limits.max_body_bytes)" in answer["detail"]
    _, answer = served.post("/rank", BAD_RANK["history spanning 60 years"][0])
    assert "2^30" in answer["detail"]
    status, answer = served.post("/rank", raw=b"user_id=1", headers={"Content-Type": "text/plain"})
    assert status == 422


def test_oversized_chunked_body_is_refused_while_read(served: World) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunk = b'{"user_id": 1, "candidates": [' + b"1," * MAX_BODY + b"1]}"
    conn.request(
        "POST",
        "/rank",
        body=iter([chunk[i : i + 4096] for i in range(0, len(chunk), 4096)]),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 413, response.read()
    conn.close()
    assert request(served.url, "GET", "/healthz")[0] == 200
