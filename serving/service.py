"""A replica's recommender without the HTTP layer: requests in, scoring batches out.

`RecommenderService` ties the pieces together: the registry watcher (`serving.versions`), the
batched feature reader (`serving.features`) and the scorer (`serving.scorer`). It turns a
validated request body (`serving.schemas`) into a job bound to the version answering now, and
checks what depends on the replica's config (limits, action names) with a `RequestError` that
carries the 4xx and the reason. serving/app.py puts it behind FastAPI and `@serve.batch`; the
same object can be driven directly:

    service = RecommenderService(config=load_serving_config({"registry": ".state/registry"}))
    job = service.rank_job(RankRequest(user_id=7, candidates=[3, 5]), arrived=time.perf_counter())
    [answer] = service.scorer.run_batch([job])
"""

from __future__ import annotations

import time

import numpy as np
import torch

from serving.config import ServingConfig
from serving.features import Events, FeatureReader
from serving.schemas import Event, RankRequest, RetrieveRequest
from serving.scorer import RankJob, RetrieveJob, Scorer
from serving.versions import ServedVersion, VersionWatcher
from trainer.registry import Registry


class RequestError(ValueError):
    """A request serving will not answer: the HTTP status and the reason (quoting the value)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class RecommenderService:
    """Everything one replica runs; see the module docstring."""

    def __init__(self, *, config: ServingConfig) -> None:
        torch.set_num_threads(config.num_threads)
        self.config = config
        self.watcher = VersionWatcher(
            registry=Registry(config.registry_dir),
            score=config.score,
            poll_interval_s=config.poll_interval_s,
            activate_delay_s=config.activate_delay_s,
        )
        self.features = FeatureReader(config=config.features)
        self.features.open()
        self.scorer = Scorer(config=config, features=self.features)
        self.watcher.start()

    def close(self) -> None:
        self.watcher.stop()
        self.features.close()

    # ------------------------------------------------------------------ requests -> jobs
    def served(self) -> ServedVersion:
        """The version answering now (read once per request), or 503 when none is loaded."""
        served = self.watcher.current
        if served is None:
            reason = f" (last error: {self.watcher.last_error})" if self.watcher.last_error else ""
            raise RequestError(
                503,
                f"no model version is loaded from {self.watcher.registry.root}{reason}: publish one with "
                "`python -m trainer.offline_train --config trainer/configs/hstu.yaml model.layout=interleaved "
                f"--publish {self.watcher.registry.root}`",
            )
        return served

    def rank_job(self, request: RankRequest, *, arrived: float) -> RankJob:
        limits = self.config.limits
        if len(request.candidates) > limits.max_candidates:
            raise RequestError(
                422,
                f"candidates has {len(request.candidates)} ids, the limit is {limits.max_candidates} "
                "(limits.max_candidates): send fewer, or split them over several requests",
            )
        served = self.served()
        return RankJob(
            served=served,
            user_id=request.user_id,
            candidates=np.array(request.candidates, dtype=np.int64),
            top_k=request.top_k,
            recent=self._recent(request.recent_events, served),
            request_ts_ms=request.request_ts_ms if request.request_ts_ms is not None else _now_ms(),
            arrived=arrived,
        )

    def retrieve_job(self, request: RetrieveRequest, *, arrived: float) -> RetrieveJob:
        limits = self.config.limits
        if request.k > limits.max_k:
            raise RequestError(422, f"k ({request.k}) is more than limits.max_k ({limits.max_k}): ask for fewer")
        served = self.served()
        return RetrieveJob(
            served=served,
            user_id=request.user_id,
            k=request.k,
            exclude_seen=request.exclude_seen,
            recent=self._recent(request.recent_events, served),
            request_ts_ms=request.request_ts_ms if request.request_ts_ms is not None else _now_ms(),
            arrived=arrived,
        )

    def _recent(self, events: list[Event], served: ServedVersion) -> Events | None:
        """`recent_events` as arrays, action names turned into the model's codes."""
        if not events:
            return None
        limit = self.config.limits.max_recent_events
        if len(events) > limit:
            raise RequestError(
                422, f"recent_events has {len(events)} events, the limit is {limit} (limits.max_recent_events)"
            )
        names = {name: code for code, name in enumerate(served.actions)}
        codes = []
        for i, event in enumerate(events):
            action = event.action
            if isinstance(action, str):
                if action not in names:
                    raise RequestError(
                        422, f"recent_events[{i}].action {action!r} is not one of {list(served.actions)}"
                    )
                action = names[action]
            elif not 0 <= action < len(served.actions):
                raise RequestError(
                    422,
                    f"recent_events[{i}].action {action} is not an action code in [0, {len(served.actions) - 1}] "
                    f"({list(served.actions)})",
                )
            codes.append(action)
        return (
            np.array([e.item_id for e in events], dtype=np.int64),
            np.array(codes, dtype=np.int64),
            np.array([e.ts_ms for e in events], dtype=np.int64),
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
