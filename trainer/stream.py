"""Continuous training from the stream: the logic behind `trainer/stream_train.py`.

One run has four parts, all in one Ray cluster:

1. **The streaming job** (`streaming.pipeline.StreamJob`), run here as a restartable actor, or
   one already running that this run attaches to (`attach=true`). It applies events to Feast and
   commits its own offsets at its own pace, and puts each micro-batch's training examples into
   the training feed, which never makes it wait (streaming/training_feed.py).
2. **The training feed**: per user, the latest sequence and the events no model has trained on.
3. **Ray Train workers** (`TorchTrainer`, N data-parallel workers; CPU by default, a GPU and the
   Triton kernels when one is there). Rank 0 takes everything pending from the feed and sends it
   to every rank; each rank trains on its share of the users through the one training step
   (`trainer.step.train_step`), with the observed ids all-gathered (identical tables on every
   rank) and the gradients averaged. A trainer that fell behind takes one larger, coalesced batch.
4. **The registry**: rank 0 publishes a model version every `publish.every_s` (between steps,
   inside a long take too: a fresh run's first take holds the whole backlog, and its first version
   comes after `every_s`, not after the backlog) and at the end. A version published inside a take
   says the offsets trained up to before that take: what it has trained on for certain.

Progress is offsets. A checkpoint (weights, optimizer, item table, and the offsets trained up
to) is reported through `ray.train.report` every `train.checkpoint_every_steps` steps or
`train.checkpoint_every_s` seconds; a worker that dies is replaced (`FailureConfig`) and the run
resumes from the last checkpoint. Whatever lies between the checkpoint's offsets and where the
feed now begins (events the feed delivered to a trainer that died before its checkpoint, or held
by a feed that was lost; the source's end when a new feed has had nothing put yet) is re-read
from the source (`streaming.sources.read_valid_events`) and trained, with the users' current
sequences from Feast as context. So every event is trained at least once, or counted in
`untrained_events` when it rolled out of `max_len` first.

Before training on a take, rank 0 scores its new events with the current model (prequential
HR@10, NDCG@10, action AUC; trainer/prequential.py) and with a popularity baseline, logs them,
writes them to `prequential.jsonl` and each manifest, and plots them at the end.

The training context can be shorter than the serving context: `train.context_events` keeps that
many events before each example's new ones (the new ones are all kept), which bounds the cost of
an example whatever its history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from config.loader import ConfigError, from_dict, to_dict
from config.paths import REPO_ROOT, state_dir
from features.sequence_batch import SequenceBatch, concat_batches, slice_events, take_users
from features.sequences import SequenceStore, SequenceStoreConfig
from streaming.config import StreamJobConfig
from streaming.offsets import Offsets, write_atomic
from trainer.checkpoint import load_into, read_metadata, save_checkpoint
from trainer.embedding_table import DynamicEmbeddingTable, TableConfig
from trainer.losses import GenerativeLoss, LossConfig
from trainer.memory import release_free_memory
from trainer.model import HSTUModel, ModelConfig, build_model
from trainer.prequential import Popularity, hr_ndcg, score_new_events
from trainer.registry import Registry
from trainer.step import StepResult, new_item_ids, train_step

log = logging.getLogger("trainer.stream")
CONTROL_ACTOR = "hstu-stream-control"
STREAMING_ACTOR = "hstu-streaming-job"


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How the workers train.

    workers / cpus_per_worker: the data-parallel Ray Train workers and the logical CPUs each
      asks for (fractional is fine: on a small machine the streaming job's Ray Data tasks need
      CPUs too). device: "auto" (a GPU per worker when the cluster has them, else CPU), "cpu" or
      "cuda". threads: torch threads per worker. placement: Ray Train's placement strategy for
      the workers ("PACK": as few nodes as fit; "SPREAD": across the cluster's nodes).
    batch_size: examples (users) per step per worker.
    context_events: events of context kept before each example's new events (null: all of them,
      up to model.max_seq_len + 1).
    checkpoint_every_steps / checkpoint_every_s: a checkpoint after whichever comes first (checked
      after each take); keep_checkpoints: how many Ray Train keeps; max_failures: worker-group
      restarts before the run fails.
    poll_s: how long rank 0 waits between looks at an empty feed.
    trained_log: a folder where each rank appends the (user_id, item_id, ts_ms) of every event
      it trained on as a target (int64 triples), for audits and tests; null: none.
    """

    workers: int = 1
    cpus_per_worker: float = 1.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 1
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    context_events: int | None = 64
    seed: int = 0
    checkpoint_every_steps: int = 200
    checkpoint_every_s: float = 60.0
    keep_checkpoints: int = 2
    max_failures: int = 3
    poll_s: float = 0.5
    progress_every_s: float = 5.0
    malloc_trim_every_steps: int = 2000
    trained_log: Path | None = None


@dataclass(frozen=True, kw_only=True)
class PublishSettings:
    """Model versions: `registry` folder (null: .state/registry), one every `every_s` and at the end;
    the last `keep` are kept."""

    registry: Path | None = None
    every_s: float = 30.0
    keep: int = 5


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Prequential scoring before each take: at most `max_events` new events (a sample of users),
    top-`k` metrics; the popularity baseline counts the last `popularity_window` trained events."""

    enabled: bool = True
    max_events: int = 2000
    k: int = 10
    popularity_window: int = 20_000


@dataclass(frozen=True, kw_only=True)
class StopSettings:
    """When to stop (besides SIGTERM / Ctrl-C): `until_idle`, once the streaming job has caught
    up (or stopped) and everything it applied is trained; `max_events`, after that many events
    trained (targets)."""

    until_idle: bool = False
    max_events: int | None = None


@dataclass(frozen=True, kw_only=True)
class StreamTrainConfig:
    """Everything `trainer/stream_train.py` needs; shipped as trainer/configs/stream.yaml.

    attach: the streaming job runs already (started with `feed.enabled=true` and the same feed
      name): use its feed instead of running one. storage_dir: Ray Train's checkpoints and this
      run's prequential log and plot (null: .state/stream_train/<name>). ray_address: a cluster to
      join (null: RAY_ADDRESS, else a local Ray with `ray_num_cpus` logical CPUs).
    """

    name: str = "hstu-stream"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(layout="interleaved", num_time_buckets=64))
    table: TableConfig = field(default_factory=lambda: TableConfig(capacity=100_000, dim=50))
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    stop: StopSettings = field(default_factory=StopSettings)
    streaming: StreamJobConfig = field(default_factory=StreamJobConfig)
    attach: bool = False
    storage_dir: Path | None = None
    ray_address: str | None = None
    ray_num_cpus: int = 6

    def __post_init__(self) -> None:
        if self.table.dim != self.model.dim:
            raise ValueError(f"table.dim ({self.table.dim}) must equal model.dim ({self.model.dim})")
        if self.streaming.max_len > self.model.max_seq_len + 1:
            raise ValueError(
                f"streaming.max_len ({self.streaming.max_len}) must be at most model.max_seq_len + 1 "
                f"({self.model.max_seq_len + 1}): an example holds at most that many events"
            )
        t = self.train
        for name, value in (
            ("train.workers", t.workers),
            ("train.threads", t.threads),
            ("train.batch_size", t.batch_size),
            ("train.checkpoint_every_steps", t.checkpoint_every_steps),
            ("train.keep_checkpoints", t.keep_checkpoints),
            ("publish.keep", self.publish.keep),
        ):
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if t.cpus_per_worker <= 0 or t.poll_s <= 0 or self.publish.every_s <= 0:
            raise ValueError(
                f"train.cpus_per_worker ({t.cpus_per_worker}), train.poll_s ({t.poll_s}) and publish.every_s "
                f"({self.publish.every_s}) must be > 0"
            )
        if t.context_events is not None and t.context_events < 0:
            raise ValueError(f"train.context_events ({t.context_events}) must be >= 0, or null for the whole sequence")
        if self.stop.max_events is not None and self.stop.max_events < 1:
            raise ValueError(f"stop.max_events ({self.stop.max_events}) must be >= 1, or null")

    def job_config(self) -> StreamJobConfig:
        """The streaming job's config: this run's, with the feed on (and, until idle, stopping idle)."""
        feed = replace(self.streaming.feed, enabled=True)
        return replace(self.streaming, feed=feed, stop_when_idle=self.streaming.stop_when_idle or self.stop.until_idle)

    def run_dir(self) -> Path:
        return self.storage_dir if self.storage_dir is not None else state_dir("stream_train", self.name)

    def registry_dir(self) -> Path:
        return self.publish.registry if self.publish.registry is not None else state_dir("registry")


def load_stream_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> StreamTrainConfig:
    from config.loader import load_config

    return load_config(StreamTrainConfig, path, overrides)


# ------------------------------------------------------------------------------ actors
def _control_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class RunControl:
        """A stop flag the driver sets (SIGTERM, Ctrl-C) and rank 0 reads between steps."""

        def __init__(self) -> None:
            self.stop = ""

        def request_stop(self, reason: str) -> None:
            self.stop = self.stop or reason

        def stop_reason(self) -> str:
            return self.stop

    return RunControl


def _streaming_actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
    class StreamingJobActor:
        """The streaming job in its own process; restarted by Ray if it dies (it resumes from its
        committed offsets, as a restarted `python -m streaming.job` does)."""

        def __init__(self, config: dict) -> None:
            from config.logs import setup_logging
            from streaming.pipeline import StreamJob

            setup_logging()
            self.job = StreamJob(from_dict(StreamJobConfig, config))
            self.summary: dict | None = None
            self.error = ""
            self.thread = threading.Thread(target=self._run, name="streaming-job", daemon=True)
            self.thread.start()

        def _run(self) -> None:
            try:
                self.summary = self.job.run().to_dict()
            except Exception as exc:  # reported through status(); the trainer decides
                self.error = repr(exc)
                log.exception("the streaming job failed")

        def pid(self) -> int:
            return os.getpid()

        def status(self) -> dict:
            return {"running": self.thread.is_alive(), "summary": self.summary, "error": self.error}

        def stop(self, timeout_s: float = 120.0) -> dict:
            self.job.stop("trainer")
            self.thread.join(timeout_s)
            return self.status()

    return StreamingJobActor


# ------------------------------------------------------------------------- data parallelism
class TorchCollective:
    """`trainer.step.Collective` over torch.distributed (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world = dist.get_world_size()

    def gather_ids(self, ids: np.ndarray, now_s: float) -> tuple[np.ndarray, float]:
        gathered: list = [None] * self.world
        self.dist.all_gather_object(gathered, (np.asarray(ids, dtype=np.int64), float(now_s)))
        return np.concatenate([g[0] for g in gathered]), max(g[1] for g in gathered)

    def average_gradients(self, parameters: list[torch.Tensor]) -> None:
        # Every rank ends with the same gradient for every parameter (zeros where it had none),
        # so every rank's optimizer makes the same update.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for p in parameters:
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).clone()
            at += n

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


# ------------------------------------------------------------------------------ examples
def training_window(examples: SequenceBatch, *, context_events: int | None, max_events: int) -> SequenceBatch:
    """Each example cut to its new events plus `context_events` before them, at most `max_events`."""
    lengths = examples.lengths
    keep = lengths if context_events is None else np.minimum(lengths, examples.num_new + context_events)
    keep = np.minimum(keep, max_events)
    rows = np.arange(len(examples))
    return slice_events(examples, rows, lengths - keep, lengths, num_new=np.minimum(examples.num_new, keep))


def recovery_examples(job: StreamJobConfig, start: Offsets, *, store: SequenceStore) -> tuple[SequenceBatch, int, int]:
    """Examples for the events from `start` on that the feed will not deliver again.

    Reads every valid event from `start` to the source's current end, and each touched user's
    current sequence from Feast. A user's sequence holds its events up to its watermark, so the
    user's events at or below the watermark (and from `start` on) are its trailing new ones;
    later events are not applied yet and will come through the feed. The job goes on applying
    while this reads, so a sequence may already hold events past the end read: those are read
    too (up to the watermarks), else they would be taken for the owed ones and the owed ones
    lost. Returns (examples, events re-read, events that no longer fit the sequence: untrained)."""
    from streaming.sources import read_valid_events

    events = read_valid_events(job, start)
    if events.num_rows == 0:
        return SequenceBatch.empty().with_num_new(np.zeros(0, np.int64)), 0, 0
    users = events.column("user_id").to_numpy()
    partition = events.column("partition").to_numpy().astype(np.int64)
    offset = events.column("offset").to_numpy()
    uniq = np.unique(users)
    current = store.read_many(uniq.astype(np.int64))
    beyond = {}  # partition -> (the first offset not read, past the highest watermark)
    for p in np.unique(current.last_partition[current.last_partition >= 0]).tolist():
        mark = int(current.last_offset[current.last_partition == p].max())
        read_to = int(offset[partition == p].max()) if (partition == p).any() else int(start.get(p, 0)) - 1
        if mark > read_to:
            beyond[p] = (read_to + 1, mark + 1)
    if beyond:
        begin, end = {p: a for p, (a, _) in beyond.items()}, {p: b for p, (_, b) in beyond.items()}
        more = read_valid_events(job, begin, end=end)
        mine = np.isin(more.column("user_id").to_numpy(), uniq)  # other users' events come through the feed
        users = np.concatenate([users, more.column("user_id").to_numpy()[mine]])
        partition = np.concatenate([partition, more.column("partition").to_numpy().astype(np.int64)[mine]])
        offset = np.concatenate([offset, more.column("offset").to_numpy()[mine]])
    inverse = np.searchsorted(uniq, users)
    applied = (partition == current.last_partition[inverse]) & (offset <= current.last_offset[inverse])
    owed = np.bincount(inverse[applied], minlength=len(uniq)).astype(np.int64)
    num_new = np.minimum(owed, current.lengths)
    rows = np.flatnonzero(num_new > 0)
    examples = take_users(current.with_num_new(num_new), rows)
    return examples, int(applied.sum()), int((owed - num_new).sum())


def merge_examples(first: SequenceBatch, second: SequenceBatch) -> SequenceBatch:
    """Users of both: `first`'s example wins (a recovery example covers the feed's too)."""
    extra = np.flatnonzero(~np.isin(second.user_ids, first.user_ids))
    return concat_batches([first, take_users(second, extra)])


# ------------------------------------------------------------------------------ the worker
START_FILE = "start_offsets.json"  # in the run's folder: where a fresh run began


def write_start_offsets(run_dir: Path, offsets: Offsets) -> None:
    """Atomically, once: the offsets a fresh run began at (a later fresh start keeps the first)."""
    path = run_dir / START_FILE
    if not path.exists():
        write_atomic(path, json.dumps({str(p): int(o) for p, o in sorted(offsets.items())}).encode())


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimizer state."""

    trained: Offsets | None = None  # per partition: the next offset not trained on
    steps: int = 0
    takes: int = 0
    events_trained: int = 0  # targets
    tokens_trained: int = 0
    untrained_events: int = 0
    recovered_events: int = 0
    train_seconds: float = 0.0  # wall time inside training steps (rank 0's)
    last_version: int | None = None

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["trained"] = {str(p): o for p, o in self.trained.items()} if self.trained is not None else None
        return out

    @classmethod
    def from_json(cls, raw: dict) -> Progress:
        raw = dict(raw)
        if raw.get("trained") is not None:
            raw["trained"] = {int(p): int(o) for p, o in raw["trained"].items()}
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def _build(config: StreamTrainConfig, device: torch.device) -> tuple[HSTUModel, torch.optim.Optimizer, GenerativeLoss]:
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    table = DynamicEmbeddingTable(config=config.table)
    model = build_model(config.model, table=table).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, betas=config.train.betas, weight_decay=config.train.weight_decay
    )
    table.attach_optimizer(optimizer)
    return model, optimizer, GenerativeLoss(config=config.loss, table=table)


def train_worker(raw_config: dict) -> None:
    """The loop each Ray Train worker runs (`TorchTrainer(train_worker, train_loop_config=...)`)."""
    import ray.train

    from config.logs import setup_logging

    setup_logging()
    config = from_dict(StreamTrainConfig, raw_config)
    Worker(config, ray.train.get_context()).run()


class Worker:
    """One data-parallel worker; rank 0 also takes from the feed, scores, publishes and reports."""

    def __init__(self, config: StreamTrainConfig, context) -> None:
        self.config = config
        self.rank = context.get_world_rank()
        self.world = context.get_world_size()
        torch.set_num_threads(config.train.threads)
        use_cuda = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{context.get_local_rank()}" if use_cuda else "cpu")
        self.model, self.optimizer, self.loss_fn = _build(config, self.device)
        self.loss_fn.generator.manual_seed(config.train.seed + 1000 * self.rank)  # own negatives per rank
        self.collective = TorchCollective() if self.world > 1 else None
        self.progress = Progress()
        self.in_hand: tuple[int, int | None] = (0, None)  # (events of the take being trained, its oldest put)
        self.gap_checked = False  # rank 0: whether a take since resuming has been checked for a gap
        self.last_stop_check_t = time.monotonic()
        self.resume()
        self.rng = np.random.default_rng(config.train.seed + self.progress.takes)
        self.run_dir = config.run_dir()
        self.trained_log = None
        if config.train.trained_log is not None:
            config.train.trained_log.mkdir(parents=True, exist_ok=True)
            self.trained_log = open(config.train.trained_log / f"rank{self.rank}-{os.getpid()}.i64", "ab")
        if self.rank == 0:
            import ray

            from streaming.training_feed import FeedConsumer

            self.run_dir.mkdir(parents=True, exist_ok=True)

            job = config.job_config()
            self.feed = FeedConsumer(
                actor_name=job.feed.actor_name, namespace=job.feed.namespace, create=True, max_users=job.feed.max_users
            )
            self.store = SequenceStore(
                SequenceStoreConfig(
                    max_len=job.max_len,
                    online_store=job.feast.online_store,
                    redis_address=job.feast.redis_address,
                    state_dir=job.feast.state_dir,
                    bulk_io=job.feast.bulk_io,
                    redis_security=job.feast.redis_security,
                )
            )
            try:
                self.control = ray.get_actor(CONTROL_ACTOR, namespace=job.feed.namespace)
            except ValueError:
                self.control = None
            self.registry = Registry(config.registry_dir(), keep=config.publish.keep)
            self.popularity = Popularity(window=config.eval.popularity_window)
            self.recent: list[dict] = []  # prequential records since the last publish
            self.published_at_step = self.progress.steps if self.progress.last_version is not None else 0
            self.last_publish_t = time.monotonic()
            self.window_start = time.monotonic()
            self.window = {"events": 0, "tokens": 0, "loss": [], "steps": 0}

    # --- checkpoints --------------------------------------------------------------------------
    def resume(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            started = self.config.run_dir() / START_FILE
            if started.is_file():
                # The run started before and trained, but Ray Train registered none of its
                # checkpoints (a worker killed before the controller took its first report): start
                # the model afresh from the offsets where the run began, so the gap is re-read.
                offsets = {int(p): int(o) for p, o in json.loads(started.read_text()).items()}
                self.progress = Progress(trained=offsets)
                log.warning("rank %d: no checkpoint registered; re-reading from the run's start %s", self.rank, offsets)
            return
        with checkpoint.as_directory() as folder:
            path = Path(folder) / "state.safetensors"
            meta = read_metadata(path)
            if meta["model_config"] != to_dict(self.config.model) or meta["table_config"] != to_dict(self.config.table):
                raise ConfigError(
                    f"the checkpoint in {folder} was trained with another model or table config: use its config, or "
                    "a new storage_dir to start over"
                )
            progress = load_into(path, model=self.model, optimizer=self.optimizer)
        self.progress = Progress.from_json(progress)
        log.info("rank %d resumed at step %d, trained up to %s", self.rank, self.progress.steps, self.progress.trained)

    def model_digest(self) -> str:
        """sha256 of every tensor of the model, the item table's id map and counters included."""
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def checkpoint(self, metrics: dict) -> None:
        """Every rank calls it (ray.train.report is a barrier); rank 0 hands over the files.

        Data parallelism keeps every rank's model and table identical; each checkpoint checks it
        (the ranks' digests are all-gathered) and stops the run if they ever differ."""
        import ray.train

        digests = [self.model_digest()]
        if self.collective is not None:
            gathered: list = [None] * self.world
            self.collective.dist.all_gather_object(gathered, digests[0])
            digests = gathered
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel ranks diverged: model digests {digests}")
        metrics = {**metrics, "model_digests": digests, "table": dict(self.model.table.counters.__dict__)}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="stream-ckpt-") as folder:
            save_checkpoint(
                Path(folder) / "state.safetensors",
                model=self.model,
                optimizer=self.optimizer,
                progress=self.progress.to_json(),
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                # Unique even when a restarted run checkpoints before training anything (same step
                # and take as the checkpoint it resumed from): Ray Train would delete that one.
                checkpoint_dir_name=(
                    f"step-{self.progress.steps:09d}-take-{self.progress.takes:07d}-{time.time_ns() // 1_000_000}"
                ),
            )

    # --- rank 0: what to do next --------------------------------------------------------------
    def stop_requested(self) -> str:
        """Rank 0: why the run was asked to stop (SIGTERM, Ctrl-C, a benchmark), or ""."""
        import ray

        self.last_stop_check_t = time.monotonic()
        return ray.get(self.control.stop_reason.remote()) if self.control is not None else ""

    def stop_between_steps(self) -> str:
        """Every rank, between two steps of a take: the stop reason, the same on every rank (rank 0
        asks the control actor at most once a second and broadcasts it), or ""."""
        stop = ""
        if self.rank == 0 and time.monotonic() - self.last_stop_check_t >= 1.0:
            stop = self.stop_requested()
        if self.collective is not None:
            stop = self.collective.broadcast(stop)
        return stop

    def plan(self) -> dict:
        """Rank 0: take from the feed (plus what the checkpoint's offsets say to re-read)."""
        stop = self.stop_requested()
        if stop:
            return {"stop": stop}
        if self.config.stop.max_events is not None and self.progress.events_trained >= self.config.stop.max_events:
            return {"stop": "max_events"}
        took = self.feed.take()
        examples = took.examples
        recovered = untrained = 0
        trained = self.progress.trained
        begins, to = took.from_offsets, took.to_offsets
        if trained is not None and begins is None and not self.gap_checked:
            # Resumed onto a new feed that has had no put yet (the job restarted too, with nothing
            # new to apply, or has not begun): what the job applied after these offsets will never
            # come through it. Take the source's end for where the feed begins, rather than wait
            # for a put that may never come (and, with --until-idle, stop without the re-read).
            from streaming.sources import source_end_offsets

            begins = to = source_end_offsets(self.config.job_config())
        self.gap_checked = self.gap_checked or trained is not None
        if trained is not None and begins is not None:
            gap = {p: o for p, o in trained.items() if o < begins.get(p, o)}
            gap.update({p: 0 for p in begins if p not in trained})
            if gap:
                start = {p: trained.get(p, 0) for p in begins}
                log.info("re-reading from %s: the feed begins at %s", start, begins)
                again, recovered, untrained = recovery_examples(self.config.job_config(), start, store=self.store)
                examples = merge_examples(again, examples)
        untrained += took.untrained_events
        base = {"from": took.from_offsets, "to": to, "untrained": untrained}
        if len(examples) == 0:
            if self.config.stop.until_idle and took.producer_idle and recovered == 0:
                return {"stop": "idle", **base}
            return {"idle": True, **base}
        return {"examples": examples, "recovered": recovered, "oldest_put_ms": took.oldest_put_ms, **base}

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        last_checkpoint_t = time.monotonic()
        steps_at_checkpoint = self.progress.steps
        stopped = ""
        while not stopped:
            plan = self.plan() if self.rank == 0 else None
            if self.collective is not None:
                plan = self.collective.broadcast(plan)
            if self.progress.trained is None and plan.get("from") is not None:
                # A fresh run starts where the feed's first take begins; checkpoint that at once, so
                # a worker that dies before its first checkpoint is still re-read from there; and
                # write it down, for when Ray Train loses that report too (see resume).
                self.progress.trained = dict(plan["from"])
                if self.rank == 0:
                    write_start_offsets(self.config.run_dir(), self.progress.trained)
                self.checkpoint(self.summary("started"))
                last_checkpoint_t = time.monotonic()
            interrupted = self.train_take(plan) if "examples" in plan else ""
            self.progress.untrained_events += plan.get("untrained", 0)
            stopped = plan.get("stop", "") or interrupted
            due = (
                self.progress.steps - steps_at_checkpoint >= cfg.train.checkpoint_every_steps
                or time.monotonic() - last_checkpoint_t >= cfg.train.checkpoint_every_s
            )
            if self.rank == 0:
                self.maybe_publish(force=bool(stopped), within_take=bool(interrupted))
                self.maybe_print(force=bool(stopped))
                if "examples" not in plan and not stopped:
                    time.sleep(cfg.train.poll_s)
            if self.collective is not None:
                due = self.collective.broadcast(due)
            if stopped or (due and self.progress.steps > steps_at_checkpoint):
                self.checkpoint(self.summary(stopped or "running"))
                last_checkpoint_t = time.monotonic()
                steps_at_checkpoint = self.progress.steps
        if self.trained_log is not None:
            self.trained_log.close()
        if self.rank == 0:
            self.plot()

    def train_take(self, plan: dict) -> str:
        """Train on a take, a step at a time. A stop request ends it after the step in hand: the
        take is then unfinished, and the offsets trained to stay where it began (a resumed run
        re-reads it). Returns the stop reason, or "" once the whole take is trained."""
        cfg = self.config
        examples: SequenceBatch = plan["examples"]
        self.in_hand = (int(examples.num_new.sum()), plan.get("oldest_put_ms"))  # the lag while this trains
        examples = training_window(
            examples, context_events=cfg.train.context_events, max_events=cfg.model.max_seq_len + 1
        )
        if self.rank == 0 and cfg.eval.enabled:
            self.score(examples, plan)
        started = time.perf_counter()
        order = self.rng.permutation(len(examples))
        per_step = cfg.train.batch_size * self.world
        steps = math.ceil(len(examples) / per_step)
        stop = ""
        for s in range(steps):
            chunk = order[s * per_step : (s + 1) * per_step]
            mine = take_users(examples, np.sort(chunk[self.rank :: self.world]))
            result = train_step(
                self.model, mine, optimizer=self.optimizer, loss_fn=self.loss_fn, collective=self.collective
            )
            self.account(mine, result)
            if self.rank == 0:  # rank 0 alone, between steps: the others wait for it at the next all-reduce
                self.maybe_publish(within_take=True)
            if cfg.train.malloc_trim_every_steps and self.progress.steps % cfg.train.malloc_trim_every_steps == 0:
                release_free_memory()
            if s + 1 < steps and (stop := self.stop_between_steps()):
                log.info(
                    "rank %d: stopping after step %d of %d of take %d", self.rank, s + 1, steps, self.progress.takes
                )
                break
        self.progress.train_seconds += time.perf_counter() - started
        self.in_hand = (0, None)
        if stop:
            return stop
        self.progress.takes += 1
        self.progress.recovered_events += plan.get("recovered", 0)
        if plan.get("to") is not None:
            self.progress.trained = {**(self.progress.trained or {}), **plan["to"]}
        if self.rank == 0:
            self.popularity.update(new_item_ids(examples))
        return ""

    def account(self, batch: SequenceBatch, result: StepResult) -> None:
        """Count a step on every rank the same way (all-reduced sizes, so progress agrees)."""
        sizes = torch.tensor([result.targets, result.tokens], dtype=torch.int64)
        if self.collective is not None:
            self.collective.dist.all_reduce(sizes)
        targets, tokens = (int(v) for v in sizes)
        self.progress.steps += 1
        self.progress.events_trained += targets
        self.progress.tokens_trained += tokens
        self.in_hand = (max(0, self.in_hand[0] - targets), self.in_hand[1])
        if self.trained_log is not None and len(batch):
            keep = np.arange(batch.num_events) >= np.repeat(batch.offsets[1:] - batch.num_new, batch.lengths)
            users = np.repeat(batch.user_ids, batch.lengths)[keep]
            np.stack([users, batch.item_ids[keep], batch.timestamps_ms[keep]], axis=1).astype(np.int64).tofile(
                self.trained_log
            )
            self.trained_log.flush()
        if self.rank == 0:
            self.window["events"] += targets
            self.window["tokens"] += tokens
            self.window["steps"] += 1
            if result.targets:
                self.window["loss"].append(float(result.loss))
            self.maybe_print()

    # --- rank 0: scoring, publishing, reporting -----------------------------------------------
    def score(self, examples: SequenceBatch, plan: dict) -> None:
        cfg = self.config.eval
        order = self.rng.permutation(len(examples))
        budget = np.cumsum(examples.num_new[order])
        sample = take_users(examples, np.sort(order[: max(1, int(np.searchsorted(budget, cfg.max_events)) + 1)]))
        scores = score_new_events(self.model, sample)
        record = {
            "take": self.progress.takes,
            "time": time.time(),
            "events_trained": self.progress.events_trained,
            "model": self.config.model.encoder,
            **{f"model_{k}": v for k, v in scores.metrics(k=cfg.k).items()},
        }
        live_ids = self.model.table.live_ids().numpy()
        pop = hr_ndcg(self.popularity.ranks(scores.target_items, live_ids=live_ids), k=cfg.k)
        record.update({f"popularity_{k}": v for k, v in pop.items()})
        self.recent.append(record)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "prequential.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.last_score = record

    def maybe_publish(self, *, force: bool = False, within_take: bool = False) -> None:
        """Rank 0: publish when `publish.every_s` has passed (or `force`) and a step came since."""
        if force or time.monotonic() - self.last_publish_t >= self.config.publish.every_s:
            if self.progress.steps > self.published_at_step:  # something new to publish
                self.publish(within_take=within_take)
            self.last_publish_t = time.monotonic()

    def publish(self, *, within_take: bool = False) -> None:
        keys = [k for k in (self.recent[-1] if self.recent else {}) if k.startswith(("model_", "popularity_"))]
        metrics = {k: float(np.nanmean([r[k] for r in self.recent if k in r])) for k in keys}
        metrics.update(
            events_trained=self.progress.events_trained,
            untrained_events=self.progress.untrained_events,
            steps=self.progress.steps,
        )
        topic = self.config.job_config().source_spec()
        manifest = self.registry.publish(
            self.model,
            offsets=self.progress.trained or {},
            metrics=metrics,
            info={
                "trainer": "stream",
                "name": self.config.name,
                "source": self.config.streaming.source,
                "topic": topic.topic or str(topic.path),
                "takes": self.progress.takes,
                "within_take": within_take,
            },
        )
        self.progress.last_version = manifest.version
        self.published_at_step = self.progress.steps
        self.recent = []

    def summary(self, state: str) -> dict:
        p = self.progress
        return {
            "state": state,
            "steps": p.steps,
            "takes": p.takes,
            "events_trained": p.events_trained,
            "tokens_trained": p.tokens_trained,
            "untrained_events": p.untrained_events,
            "recovered_events": p.recovered_events,
            "last_version": p.last_version,
            "train_seconds": round(p.train_seconds, 3),
            # per second of training (wall time inside training steps), over the whole run
            "events_per_s": round(p.events_trained / p.train_seconds, 1) if p.train_seconds else 0.0,
            "tokens_per_s": round(p.tokens_trained / p.train_seconds, 1) if p.train_seconds else 0.0,
            "trained": {str(k): v for k, v in (p.trained or {}).items()},
        }

    def maybe_print(self, *, force: bool = False) -> None:
        now = time.monotonic()
        seconds = now - self.window_start
        if seconds < self.config.train.progress_every_s and not force:
            return
        stats = self.feed.stats()
        lag_events = stats["pending_events"] + self.in_hand[0]
        oldest = self.in_hand[1]
        lag_s = max(stats["pending_age_s"], (time.time_ns() // 1_000_000 - oldest) / 1000 if oldest else 0.0)
        w = self.window
        loss = f"{np.mean(w['loss']):.3f}" if w["loss"] else "-"
        score = getattr(self, "last_score", None)
        k = self.config.eval.k
        quality = (
            f" | hr@{k} {score[f'model_hr@{k}']:.3f} (popularity {score[f'popularity_hr@{k}']:.3f})" if score else ""
        )
        version = f"v{self.progress.last_version}" if self.progress.last_version is not None else "none"
        log.info(
            "stream-train: step %d | %s ev/s | %s tok/s | loss %s | lag %s events, %.1f s | untrained %d "
            "| version %s%s",
            self.progress.steps,
            f"{w['events'] / seconds:,.0f}",
            f"{w['tokens'] / seconds:,.0f}",
            loss,
            f"{lag_events:,}",
            lag_s,
            self.progress.untrained_events,
            version,
            quality,
        )
        self.window_start = now
        self.window = {"events": 0, "tokens": 0, "loss": [], "steps": 0}
        with open(self.run_dir / "progress.jsonl", "a") as fh:  # the same figures, for plots and benchmarks
            fh.write(
                json.dumps(
                    {
                        "time": time.time(),
                        "steps": self.progress.steps,
                        "lag_events": lag_events,
                        "lag_s": lag_s,
                        "events_trained": self.progress.events_trained,
                        "untrained_events": self.progress.untrained_events,
                        "version": self.progress.last_version,
                    }
                )
                + "\n"
            )

    def plot(self) -> None:
        path = self.run_dir / "prequential.jsonl"
        if not path.is_file():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if records:
            plot_prequential(records, self.run_dir / "prequential.png", title=self.config.name)


def plot_prequential(records: list[dict], path: Path, *, title: str, k: int = 10) -> None:
    """HR@k and NDCG@k of the model and of popularity against events trained, as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    x = [r["events_trained"] for r in records]
    for ax, metric in zip(fig.subplots(1, 2), (f"hr@{k}", f"ndcg@{k}")):
        ax.plot(x, [r.get(f"model_{metric}") for r in records], label=records[0].get("model", "model"))
        ax.plot(x, [r.get(f"popularity_{metric}") for r in records], label="popularity", linestyle="--")
        ax.set(xlabel="events trained", ylabel=f"prequential {metric}", title=metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------ the driver
def init_ray(config: StreamTrainConfig) -> bool:
    """Join `config.ray_address` (or RAY_ADDRESS: under `ray job submit`), else start a local Ray;
    nothing when this process is connected already. True when it started one."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    namespace = config.streaming.feed.namespace
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=True)
        return False
    # Workers of a local Ray import the project from the checkout.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=config.ray_num_cpus,
        include_dashboard=False,
        namespace=namespace,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        log_to_driver=True,
        object_store_memory=512 * 2**20,
    )
    return True


class StreamTrainer:
    """The driver: starts (or joins) Ray, the feed, the streaming job and the TorchTrainer; stops
    cleanly on SIGTERM / Ctrl-C (the workers finish the step, checkpoint, publish)."""

    def __init__(self, config: StreamTrainConfig) -> None:
        self.config = config
        self.started_ray = False
        self.streaming = None
        self.control = None

    def _init_ray(self) -> None:
        self.started_ray = init_ray(self.config)

    def start_streaming(self) -> None:
        """The streaming job as an actor (or nothing, when attaching to one that runs)."""
        import ray

        job = self.config.job_config()
        namespace = job.feed.namespace
        if self.config.attach:
            log.info("attaching to the feed %r of a running streaming job", job.feed.actor_name)
            return
        try:
            ray.kill(ray.get_actor(STREAMING_ACTOR, namespace=namespace))  # a leftover of an earlier run
        except ValueError:
            pass
        self.streaming = (
            _streaming_actor_class()
            .options(name=STREAMING_ACTOR, namespace=namespace, lifetime="detached")
            .remote(to_dict(job))
        )
        log.info(
            "streaming job started (pid %d): %s -> Feast, feed %r",
            ray.get(self.streaming.pid.remote()),
            job.source,
            job.feed.actor_name,
        )

    def request_stop(self, reason: str) -> None:
        if self.control is not None:
            self.control.request_stop.remote(reason)

    def run(self, *, handle_signals: bool = False) -> dict:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg = self.config
        self._init_ray()
        namespace = cfg.streaming.feed.namespace
        try:
            ray.kill(ray.get_actor(CONTROL_ACTOR, namespace=namespace))
        except ValueError:
            pass
        self.control = _control_actor_class().options(name=CONTROL_ACTOR, namespace=namespace).remote()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(
                    signum,
                    lambda s, f: (
                        log.info("%s: finishing the step, checkpointing, publishing", signal.Signals(s).name),
                        self.request_stop(signal.Signals(s).name),
                    ),
                )
        from streaming.training_feed import feed_actor

        job = cfg.job_config()
        feed_actor(actor_name=job.feed.actor_name, namespace=namespace, max_users=job.feed.max_users)
        self.start_streaming()
        use_gpu = cfg.train.device == "cuda" or (
            cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) >= cfg.train.workers
        )
        run_dir = cfg.run_dir()
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=to_dict(cfg),
            scaling_config=ScalingConfig(
                num_workers=cfg.train.workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                placement_strategy=cfg.train.placement,
            ),
            run_config=RunConfig(
                name="checkpoints",
                storage_path=str(run_dir),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            ),
        )
        log.info(
            "training %s (%s layout) on %d %s worker(s); checkpoints in %s; versions in %s",
            cfg.model.encoder,
            cfg.model.layout,
            cfg.train.workers,
            "GPU" if use_gpu else "CPU",
            run_dir,
            cfg.registry_dir(),
        )
        try:
            result = trainer.fit()
            summary = dict(result.metrics or {})
        finally:
            self.shutdown()
        return summary

    def shutdown(self) -> None:
        import ray

        if self.streaming is not None:
            try:
                status = ray.get(self.streaming.stop.remote(), timeout=180)
                log.info("streaming job stopped: %s", json.dumps((status or {}).get("summary") or {})[:400])
            except Exception as exc:  # stopping must not hide the run's result
                log.warning("stopping the streaming job: %r", exc)
            ray.kill(self.streaming)
            self.streaming = None
        if self.control is not None:
            ray.kill(self.control)
            self.control = None
        if self.started_ray:
            ray.shutdown()
