"""The training feed: what the trainer has not trained on yet, coalesced per user, never blocking.

The streaming job updates Feast and commits its own Kafka offsets at its own pace; it never
waits for a trainer. After each micro-batch it `put`s the batch's training examples (a
`SequenceBatch` with `num_new`: each touched user's updated sequence and the trailing events no
model has trained on) into the feed, a named Ray actor. The feed keeps, per user, only the
latest sequence and the number of events still untrained; a put merges into that:

- the newer sequence replaces the older one;
- `num_new` adds up, capped at the sequence's length: events that rolled out of `max_len` before
  any trainer took them are counted in `untrained_events`, never silently lost;
- past `max_users` pending users, the oldest pending users are dropped and their events counted
  as untrained too (the bound on the feed's memory).

A trainer `take`s everything pending at once: one example per user, all of the user's untrained
events as targets. A trainer that falls behind therefore catches up by coalescing: it takes fewer,
larger steps. Each take also says which offsets it covers (`from_offsets` to `to_offsets`: the
start of what the feed had not delivered before, the end of the last batch merged), so a trainer
keeps its own progress as offsets and can tell, after a restart, which range it must re-read
(the events the feed delivered before, that no checkpoint covers). Delivery is at least once:
a restarted streaming job re-applies batches after its last commit and puts their events again.

    >>> from streaming.training_feed import FeedState
    >>> from features.sequence_batch import SequenceBatch
    >>> feed = FeedState(max_users=10)
    >>> ex = lambda items, new: SequenceBatch.from_sequences(user_ids=[7], item_ids=[items],
    ...     actions=[[0] * len(items)], timestamps_ms=[list(range(len(items)))], num_new=[new])
    >>> feed.put({0: 0}, {0: 2}, ex([1, 2], 2), now_ms=1)
    >>> feed.put({0: 2}, {0: 3}, ex([1, 2, 3], 1), now_ms=2)
    >>> took = feed.take(now_ms=3)
    >>> took.examples.item_ids.tolist(), took.examples.num_new.tolist(), took.from_offsets, took.to_offsets
    ([1, 2, 3], [3], {0: 0}, {0: 3})

In a Ray cluster: the job holds a `TrainingFeed` (creates or attaches to the named actor) and the
trainer a `FeedConsumer`:

    feed = FeedConsumer(actor_name="hstu-training-feed", namespace="hstu")
    take = feed.take()            # FeedTake; empty examples when nothing is pending
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from features.sequence_batch import SequenceBatch, concat_batches, take_users
from streaming.offsets import Offsets


class FeedError(RuntimeError):
    """The feed cannot be found, or was handed something it cannot merge."""


@dataclass(frozen=True)
class FeedTake:
    """What one `take` returns.

    examples: one example per user (latest sequence, `num_new` = its untrained events), or empty.
    from_offsets: per partition, where the events this take holds begin: the end of the previous
      take (or where the feed started, for its first take). None when the feed has seen nothing.
    to_offsets: per partition, the end of the last micro-batch merged in.
    untrained_events: events dropped since the previous take (rolled out of max_len, or evicted).
    generation: the feed's identity; it changes when the feed is created anew (its memory lost).
    producer_done: the streaming job closed the feed (it stopped) and this take emptied it.
    producer_idle: the streaming job had caught up with its source at its last check.
    oldest_put_ms: wall time when the oldest pending event of this take reached the feed.
    """

    examples: SequenceBatch
    from_offsets: Offsets | None
    to_offsets: Offsets | None
    untrained_events: int
    generation: str
    producer_done: bool = False
    producer_idle: bool = False
    oldest_put_ms: int | None = None

    @property
    def num_events(self) -> int:
        """Untrained events (targets) in this take."""
        return int(self.examples.num_new.sum()) if self.examples.num_new is not None else 0


@dataclass
class FeedState:
    """The feed's logic (the actor wraps it; everything is vectorised over users)."""

    max_users: int = 1_000_000
    generation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.max_users < 1:
            raise FeedError(f"max_users ({self.max_users}) must be >= 1")
        self.pending = SequenceBatch.empty().with_num_new(np.zeros(0, dtype=np.int64))  # sorted by user
        self.first_put_ms = np.zeros(0, dtype=np.int64)  # per pending user: when its oldest event came
        self.delivered: Offsets | None = None  # where the next take begins
        self.end: Offsets | None = None  # end of the last batch merged
        self.untrained = 0  # since the last take
        self.untrained_total = 0
        self.events_put = 0
        self.puts = 0
        self.closed = False
        self.idle = False
        self.last_put_ms = 0

    def put(self, start: Offsets, end: Offsets, examples: SequenceBatch, *, now_ms: int, rolled_out: int = 0) -> None:
        """Merge one micro-batch's examples (users distinct) ending at offsets `end`; `rolled_out`:
        the batch's events that fell out of max_len inside the batch (counted untrained)."""
        if examples.num_new is None:
            raise FeedError("the feed takes training examples: a SequenceBatch with num_new")
        if self.delivered is None:
            self.delivered = {int(p): int(o) for p, o in start.items()}
        else:
            for p, o in start.items():
                self.delivered.setdefault(int(p), int(o))
        self.end = {
            **(self.end or {}),
            **{int(p): max(int(o), (self.end or {}).get(int(p), 0)) for p, o in end.items()},
        }
        self.puts += 1
        self.events_put += int(examples.num_new.sum())
        self._drop(rolled_out)
        self.last_put_ms = now_ms
        self.idle = False
        if len(examples) == 0:
            return
        both = concat_batches([self.pending, examples])
        stamps = np.concatenate([self.first_put_ms, np.full(len(examples), now_ms, dtype=np.int64)])
        users, inverse = np.unique(both.user_ids, return_inverse=True)
        # the newest sequence of each user: the last of its rows (pending comes first)
        last = np.zeros(len(users), dtype=np.int64)
        last[inverse] = np.arange(len(both))
        owed = np.bincount(inverse, weights=both.num_new, minlength=len(users)).astype(np.int64)
        first = np.full(len(users), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, inverse, stamps)
        merged = take_users(both, last)
        kept = np.minimum(owed, merged.lengths)
        self._drop(int((owed - kept).sum()))
        self.pending = merged.with_num_new(kept)
        self.first_put_ms = first
        if len(self.pending) > self.max_users:  # the bound: the users waiting longest go
            order = np.argsort(self.first_put_ms, kind="stable")
            drop, keep = (
                order[: len(self.pending) - self.max_users],
                np.sort(order[len(self.pending) - self.max_users :]),
            )
            self._drop(int(self.pending.num_new[drop].sum()))
            self.pending = take_users(self.pending, keep)
            self.first_put_ms = self.first_put_ms[keep]

    def _drop(self, events: int) -> None:
        self.untrained += events
        self.untrained_total += events

    def take(self, *, now_ms: int) -> FeedTake:
        """Everything pending (and the offsets it covers); the feed is empty afterwards."""
        keep = np.flatnonzero(self.pending.num_new > 0)
        examples = take_users(self.pending, keep)
        oldest = int(self.first_put_ms[keep].min()) if len(keep) else None
        took = FeedTake(
            examples=examples,
            from_offsets=dict(self.delivered) if self.delivered is not None else None,
            to_offsets=dict(self.end) if self.end is not None else None,
            untrained_events=self.untrained,
            generation=self.generation,
            producer_done=self.closed,
            producer_idle=self.idle or self.closed,
            oldest_put_ms=oldest,
        )
        if self.end is not None:
            self.delivered = {**(self.delivered or {}), **self.end}
        self.pending = SequenceBatch.empty().with_num_new(np.zeros(0, dtype=np.int64))
        self.first_put_ms = np.zeros(0, dtype=np.int64)
        self.untrained = 0
        return took

    def stats(self, *, now_ms: int) -> dict:
        pending_events = int(self.pending.num_new.sum())
        oldest = int(self.first_put_ms.min()) if len(self.first_put_ms) else None
        return {
            "generation": self.generation,
            "pending_users": len(self.pending),
            "pending_events": pending_events,
            "pending_age_s": (now_ms - oldest) / 1000 if oldest is not None else 0.0,
            "untrained_events": self.untrained_total,
            "events_put": self.events_put,
            "puts": self.puts,
            "delivered": self.delivered,
            "end": self.end,
            "closed": self.closed,
            "idle": self.idle,
        }


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=1)
    class FeedBuffer:
        """The named actor around `FeedState` (calls run one at a time, in arrival order)."""

        def __init__(self, max_users: int) -> None:
            self.state = FeedState(max_users=max_users)

        def put(self, start: Offsets, end: Offsets, examples: SequenceBatch, rolled_out: int = 0) -> None:
            self.state.put(start, end, examples, now_ms=_now_ms(), rolled_out=rolled_out)

        def take(self) -> FeedTake:
            return self.state.take(now_ms=_now_ms())

        def set_idle(self, idle: bool) -> None:
            self.state.idle = idle

        def close(self) -> None:
            self.state.closed = True

        def reopen(self) -> None:
            self.state.closed = False

        def stats(self) -> dict:
            return self.state.stats(now_ms=_now_ms())

    return FeedBuffer


def feed_actor(*, actor_name: str, namespace: str, max_users: int = 1_000_000, create: bool = True):
    """The named feed actor: an existing one (a restarted job keeps feeding the same trainer), or
    a new detached one. With create=False, FeedError when there is none."""
    import ray

    try:
        return ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        if not create:
            raise FeedError(f"no training feed {actor_name!r} in namespace {namespace!r}") from None
    return (
        _actor_class()
        .options(name=actor_name, namespace=namespace, lifetime="detached", get_if_exists=True)
        .remote(max_users)
    )


class TrainingFeed:
    """The streaming job's side: puts each micro-batch's examples; never waits for a trainer."""

    def __init__(self, *, actor_name: str, namespace: str, max_users: int) -> None:
        import ray

        self.actor = feed_actor(actor_name=actor_name, namespace=namespace, max_users=max_users)
        ray.get(self.actor.reopen.remote())  # a job (re)starting: not done any more
        self._inflight: list = []

    def publish(self, start: Offsets, end: Offsets, examples: SequenceBatch, *, rolled_out: int = 0) -> None:
        """Hand a batch's examples over. The call returns at once; at most a few puts are in flight."""
        import ray

        self._inflight.append(self.actor.put.remote(dict(start), dict(end), examples, rolled_out))
        if len(self._inflight) > 4:  # bound the memory of puts not yet merged; they take milliseconds
            ray.get(self._inflight.pop(0))

    def set_idle(self, idle: bool) -> None:
        self.actor.set_idle.remote(idle)

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())

    def close(self) -> None:
        """The job stopped: every put is merged, and consumers learn that nothing more comes."""
        import ray

        ray.get(self._inflight)
        self._inflight.clear()
        ray.get(self.actor.close.remote(), timeout=30)


class FeedConsumer:
    """A trainer's handle on the feed, from any process connected to the same Ray cluster."""

    def __init__(
        self,
        *,
        actor_name: str = "hstu-training-feed",
        namespace: str = "hstu",
        wait_s: float = 60.0,
        create: bool = False,
        max_users: int = 1_000_000,
    ) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.actor = feed_actor(actor_name=actor_name, namespace=namespace, max_users=max_users, create=create)
                break
            except FeedError:
                if time.monotonic() > deadline:
                    raise FeedError(
                        f"no training feed {actor_name!r} in namespace {namespace!r} after {wait_s:.0f} s: start "
                        "the streaming job with feed.enabled=true, or let trainer/stream_train.py run it"
                    ) from None
                time.sleep(0.2)

    def take(self) -> FeedTake:
        import ray

        return ray.get(self.actor.take.remote())

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())
