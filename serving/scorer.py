"""One serving batch, end to end: read features, merge recent events, encode, score, answer.

`Scorer.run_batch` is what `@serve.batch` hands a list of requests to (serving/app.py). It runs
off the event loop, in the replica's one compute thread, and for the whole batch:

1. reads every user's stored sequence in one Feast call (`serving.features.FeatureReader`);
2. merges each request's `recent_events` and keeps the version's `max_seq_len` latest events;
3. looks each history up in the LRU of encoded histories (`serving.history_cache`), and
   encodes the misses of each model version in one call (`HSTUModel.encode_histories`);
4. scores each request against its encoded history: `/rank` through the KV-cache form of
   M-FALCON, all of a version's requests in one pass (`HSTUModel.score_candidates_many`, in
   candidate micro-batches), `/retrieve` through `HSTUModel.retrieve_cached` over the version's
   live vocabulary;
5. serialises each answer (orjson), so the event loop only forwards bytes.

Errors are values, one per request: a bad request gets a `JobError` with its 4xx and reason, the
others in the batch are answered normally.

**Engagement score.** The model's action head gives P(action a | user, item) over the action
vocabulary (softmax of `score_candidates`' logits: which action the user would take on the
item). The score is sum_a weight[a] * P(a), the expected weight of that action; with the
default weights 1..5 over `rate_1`..`rate_5` it is the expected rating (`ScoreConfig`).

**Cold start.** A user with no stored events and no `recent_events` cannot be encoded: `/rank`
orders the candidates by their count in the answering version's vocabulary (score = the item's
share of all counts; `probabilities` null) and `/retrieve` returns the most counted items; both
say `cold_start: true`. A candidate the version's table does not hold is scored through the
out-of-vocabulary row and flagged `oov: true`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import orjson
import torch

from features.sequence_batch import SequenceBatch
from kernels.hstu_attention import KernelInputError
from serving.config import ServingConfig
from serving.features import Events, FeatureReader, merge_recent
from serving.history_cache import CacheKey, HistoryLRU, cache_key
from serving.versions import ServedVersion
from trainer.embedding_table import TableError
from trainer.layout import ModelInputError
from trainer.model import HistoryCache

log = logging.getLogger(__name__)

COLD_START_SCORE = "popularity: the item's share of the answering version's vocabulary counts"


@dataclass(frozen=True, kw_only=True)
class RankJob:
    served: ServedVersion  # read once when the request arrived: it finishes on this version
    user_id: int
    candidates: np.ndarray  # int64
    top_k: int | None
    recent: Events | None
    request_ts_ms: int
    arrived: float  # time.perf_counter() when the replica received the request


@dataclass(frozen=True, kw_only=True)
class RetrieveJob:
    served: ServedVersion
    user_id: int
    k: int
    exclude_seen: bool
    recent: Events | None
    request_ts_ms: int
    arrived: float


Job = RankJob | RetrieveJob


@dataclass(frozen=True)
class JobError:
    """A request the batch could not answer: its HTTP status and the reason."""

    status: int
    detail: str


def score_definition(served: ServedVersion) -> str:
    weights = ", ".join(f"{a}: {w:g}" for a, w in zip(served.actions, served.weights.tolist()))
    return f"sum_a weight[a] * P(action a | user, item), weights {{{weights}}}"


class Scorer:
    """Runs serving batches; holds the feature reader and the encoded-history cache."""

    def __init__(self, *, config: ServingConfig, features: FeatureReader) -> None:
        self.config = config
        self.features = features
        self.cache = HistoryLRU(max_bytes=int(config.history_cache_mb * 2**20))
        self._versions_seen: set[int] = set()

    def run_batch(self, jobs: list[Job]) -> list[bytes | JobError]:
        """Answer every job (JSON bytes) or say why not (`JobError`), in order."""
        started = time.perf_counter()
        versions = {job.served.version for job in jobs}
        if versions != self._versions_seen:
            # A swap: entries of versions nobody asks for any more only take memory.
            self.cache.retain_versions(versions)
            self._versions_seen = versions
        users = np.unique(np.array([job.user_id for job in jobs], dtype=np.int64))
        try:
            stored = self.features.read(users)
        except Exception as error:  # the store is down or unreadable: every job of the batch
            log.exception("feature read failed")
            return [JobError(503, f"feature store read failed: {error!r}")] * len(jobs)
        features_ms = 1000 * (time.perf_counter() - started)
        histories = [self._history(job, stored, int(np.searchsorted(users, job.user_id))) for job in jobs]
        encoded, encode_ms = self._encode(jobs, histories)
        caches: list[HistoryCache | JobError | None] = [
            encoded[history[1]] if history is not None else None for history in histories
        ]
        logits = self._score(jobs, caches)
        results: list[bytes | JobError] = []
        for i, (job, history, cache) in enumerate(zip(jobs, histories, caches)):
            if isinstance(cache, JobError):
                results.append(cache)
                continue
            if isinstance(logits.get(i), JobError):
                results.append(logits[i])
                continue
            timings = {
                "queue": 1000 * (started - job.arrived),
                "features": features_ms,
                "encode": encode_ms.get(history[1], 0.0) if history is not None else 0.0,
            }
            try:
                if isinstance(job, RankJob):
                    results.append(self._rank(job, history, logits.get(i), timings))
                else:
                    results.append(self._retrieve(job, history, cache, timings))
            except (ModelInputError, KernelInputError, TableError) as error:
                results.append(JobError(422, str(error)))
            except Exception as error:  # never let one request take the replica down
                log.exception("request for user %d failed", job.user_id)
                results.append(JobError(500, f"internal error: {error!r}"))
        return results

    # ------------------------------------------------------------------ features
    @staticmethod
    def _history(job: Job, stored: SequenceBatch, row: int) -> tuple[Events, CacheKey] | None:
        """The merged events and cache key of a job's user; None for a cold start."""
        seq = stored.sequence(row)
        events = merge_recent(
            seq.item_ids, seq.actions, seq.timestamps_ms, recent=job.recent, max_events=job.served.max_events
        )
        if len(events[0]) == 0:
            return None
        key = cache_key(job.served.version, job.user_id, seq.last_partition, seq.last_offset, *events)
        return events, key

    def _encode(
        self, jobs: list[Job], histories: list[tuple[Events, CacheKey] | None]
    ) -> tuple[dict[CacheKey, HistoryCache | JobError], dict[CacheKey, float]]:
        """Every job's encoded history by key (cache hits, then the misses of each version in one
        call); the encode time each miss cost."""
        encoded: dict[CacheKey, HistoryCache | JobError] = {}
        missing: dict[int, dict[CacheKey, Events]] = defaultdict(dict)
        served_of: dict[int, ServedVersion] = {}
        for job, history in zip(jobs, histories):
            if history is None:
                continue
            events, key = history
            if key in encoded or key in missing[job.served.version]:
                continue
            hit = self.cache.get(key)
            if hit is not None:
                encoded[key] = hit
            else:
                missing[job.served.version][key] = events
                served_of[job.served.version] = job.served
        encode_ms: dict[CacheKey, float] = {}
        for version, todo in missing.items():
            if not todo:
                continue
            started = time.perf_counter()
            model = served_of[version].model
            try:
                caches = self._encode_many(model, list(todo.values()))
            except (ModelInputError, KernelInputError, TableError):
                # One history the model refuses fails the joint call: encode alone to find it.
                caches = []
                for events in todo.values():
                    try:
                        caches.append(self._encode_many(model, [events])[0])
                    except (ModelInputError, KernelInputError, TableError) as error:
                        caches.append(JobError(422, str(error)))
            share = 1000 * (time.perf_counter() - started) / len(todo)
            for key, cache in zip(todo, caches):
                encoded[key] = cache
                encode_ms[key] = share
                if not isinstance(cache, JobError):
                    self.cache.put(key, cache)
        return encoded, encode_ms

    def _score(self, jobs: list[Job], caches: list) -> dict[int, tuple[torch.Tensor, float] | JobError]:
        """Action logits of every warm `/rank` job (with the scoring time each one's share cost):
        the jobs of each version in one `score_candidates_many` pass."""
        by_version: dict[int, list[int]] = defaultdict(list)
        for i, (job, cache) in enumerate(zip(jobs, caches)):
            if isinstance(job, RankJob) and isinstance(cache, HistoryCache):
                by_version[job.served.version].append(i)
        scored: dict[int, tuple[torch.Tensor, float] | JobError] = {}
        for members in by_version.values():
            started = time.perf_counter()
            try:
                logits = self._score_many([jobs[i] for i in members], [caches[i] for i in members])
            except (ModelInputError, KernelInputError, TableError):
                logits = []  # one job the model refuses fails the joint pass: score alone to find it
                for i in members:
                    try:
                        logits.append(self._score_many([jobs[i]], [caches[i]])[0])
                    except (ModelInputError, KernelInputError, TableError) as error:
                        logits.append(JobError(422, str(error)))
            share = 1000 * (time.perf_counter() - started) / len(members)
            for i, result in zip(members, logits):
                scored[i] = result if isinstance(result, JobError) else (result, share)
        return scored

    def _score_many(self, jobs: list[RankJob], caches: list[HistoryCache]) -> list[torch.Tensor]:
        candidates = [torch.from_numpy(job.candidates) for job in jobs]
        return jobs[0].served.model.score_candidates_many(
            caches,
            candidate_ids=candidates,
            candidate_timestamps_ms=[torch.full_like(c, job.request_ts_ms) for c, job in zip(candidates, jobs)],
            request_timestamps_ms=[job.request_ts_ms for job in jobs],
            micro_batch=self.config.batching.micro_batch,
        )

    @staticmethod
    def _encode_many(model, histories: list[Events]) -> list[HistoryCache]:
        lengths = [len(events[0]) for events in histories]
        offsets = torch.zeros(len(histories) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
        columns = [torch.from_numpy(np.concatenate([events[i] for events in histories])) for i in range(3)]
        return model.encode_histories(
            item_ids=columns[0], actions=columns[1], timestamps_ms=columns[2], offsets=offsets
        )

    # ------------------------------------------------------------------ answers
    def _rank(
        self,
        job: RankJob,
        history: tuple[Events, CacheKey] | None,
        scored: tuple[torch.Tensor, float] | None,
        timings: dict,
    ) -> bytes:
        served, model = job.served, job.served.model
        started = time.perf_counter()
        oov = (model.table.lookup(job.candidates) < model.table.first_item_row).numpy()
        if scored is None:  # a cold start
            counts = served.popularity(job.candidates)
            total = float(served.vocab_counts.sum())
            scores = counts / total if total > 0 else counts
            probabilities = None
            model_ms = 0.0
        else:
            logits, model_ms = scored
            probs = torch.softmax(logits, dim=-1)
            scores = (probs @ served.weights).numpy()
            probabilities = probs.numpy()
        order = np.argsort(-scores, kind="stable")
        if job.top_k is not None:
            order = order[: job.top_k]
        ids, score_list, oov_list = job.candidates[order].tolist(), scores[order].tolist(), oov[order].tolist()
        prob_list = probabilities[order].tolist() if probabilities is not None else [None] * len(ids)
        items = [
            {"item_id": i, "score": s, "probabilities": p, "oov": o}
            for i, s, p, o in zip(ids, score_list, prob_list, oov_list)
        ]
        timings["score"] = model_ms + 1000 * (time.perf_counter() - started)
        timings["replica"] = 1000 * (time.perf_counter() - job.arrived)
        return orjson.dumps(
            {
                "user_id": job.user_id,
                "version": served.version,
                "cold_start": scored is None,
                "score": COLD_START_SCORE if scored is None else score_definition(served),
                "actions": list(served.actions),
                "request_ts_ms": job.request_ts_ms,
                "history_events": len(history[0][0]) if history is not None else 0,
                "items": items,
                "timings_ms": timings,
            }
        )

    def _retrieve(
        self, job: RetrieveJob, history: tuple[Events, CacheKey] | None, cache: HistoryCache | None, timings: dict
    ) -> bytes:
        served, model = job.served, job.served.model
        started = time.perf_counter()
        if cache is None:
            ids = served.popular_ids[: job.k]
            scores = served.popularity(ids)
        else:
            top, values = model.retrieve_cached(
                cache,
                k=job.k,
                exclude_seen=job.exclude_seen,
                request_timestamp_ms=job.request_ts_ms,
                item_embeddings=served.item_embeddings,
            )
            keep = torch.isfinite(values)  # fewer live unseen items than k: -inf rows are no answer
            ids, scores = top[keep].numpy(), values[keep].numpy()
        items = [{"item_id": i, "score": s} for i, s in zip(ids.tolist(), scores.tolist())]
        timings["score"] = 1000 * (time.perf_counter() - started)
        timings["replica"] = 1000 * (time.perf_counter() - job.arrived)
        return orjson.dumps(
            {
                "user_id": job.user_id,
                "version": served.version,
                "cold_start": cache is None,
                "request_ts_ms": job.request_ts_ms,
                "history_events": len(history[0][0]) if history is not None else 0,
                "items": items,
                "timings_ms": timings,
            }
        )
