"""The training feed: each micro-batch's updated sequences, handed to trainers through Ray.

The job puts every micro-batch's training examples (a `features.sequence_batch.SequenceBatch`
with `num_new`: each user's updated sequence and the trailing events no model has trained on,
from `streaming.sequence_update.training_examples`) into Ray's object store and registers the
reference with `FeedBuffer`, a named
async actor. Every configured consumer reads every batch, in order, and acknowledges it once
trained on (for a trainer: once the checkpoint that includes it is saved). The buffer is bounded:
when `capacity` batches are out but not acknowledged by all consumers, the job waits before
reading more from Kafka, which simply holds the rest (backpressure). The job commits Kafka offsets
only up to the last batch that every consumer has acknowledged.

A consumer, in any process of the same Ray cluster:

    >>> from streaming.training_feed import FeedConsumer
    >>> feed = FeedConsumer("trainer")              # the name listed in feed.consumers
    >>> batch = feed.next(timeout_s=5)              # None when nothing arrives in time
    >>> if batch is not None:
    ...     train_on(batch.examples)                # a SequenceBatch with num_new
    ...     feed.ack(batch.batch_id)

Consumers are at-least-once across job crashes: a batch that was applied but not committed is
delivered again after the restart (its events come back with `num_new` covering them).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from features.sequence_batch import SequenceBatch
from streaming.offsets import Offsets


class FeedError(RuntimeError):
    """A consumer name or acknowledgement the feed does not know."""


class FeedClosed(FeedError):
    """The job closed the feed (it stopped) and this consumer has read everything."""


@dataclass(frozen=True)
class FeedBatch:
    """One micro-batch as a consumer sees it: its id, the offsets it ends at, the examples."""

    batch_id: int
    end_offsets: Offsets
    examples: SequenceBatch


class _FeedBufferImpl:
    """The buffer's logic (the actor class wraps it); every method is called on the actor's loop."""

    def __init__(self, consumers: tuple[str, ...], capacity: int) -> None:
        if not consumers:
            raise FeedError("a training feed needs at least one consumer name")
        self.consumers = tuple(consumers)
        self.capacity = capacity
        self.batches: dict[int, tuple[Offsets, list]] = {}  # id -> (end offsets, [ObjectRef])
        self.order: list[int] = []
        self.next_index = dict.fromkeys(self.consumers, 0)  # consumer -> index into self.order
        self.acked = {c: -1 for c in self.consumers}  # consumer -> highest acked batch id
        self.changed = asyncio.Condition()
        self.closed = False

    def _outstanding(self) -> int:
        floor = min(self.acked.values())
        return sum(1 for b in self.order if b > floor)

    def _check(self, consumer: str) -> None:
        if consumer not in self.next_index:
            raise FeedError(f"consumer {consumer!r} is not one of the feed's consumers {list(self.consumers)}")

    async def wait_for_room(self, timeout_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self._outstanding() < self.capacity), timeout_s)
            except TimeoutError:
                return False
            return True

    async def put(self, batch_id: int, end_offsets: Offsets, ref_box: list) -> None:
        async with self.changed:
            if self.order and batch_id <= self.order[-1]:
                raise FeedError(f"batch ids must increase: {batch_id} after {self.order[-1]}")
            self.batches[batch_id] = (dict(end_offsets), ref_box)
            self.order.append(batch_id)
            self.changed.notify_all()

    async def get(self, consumer: str, timeout_s: float):
        self._check(consumer)
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.closed or self.next_index[consumer] < len(self.order)), timeout_s
                )
            except TimeoutError:
                return None
            if self.next_index[consumer] >= len(self.order):
                return "closed" if self.closed else None
            batch_id = self.order[self.next_index[consumer]]
            self.next_index[consumer] += 1
            end, box = self.batches[batch_id]
            return batch_id, end, box

    async def ack(self, consumer: str, batch_id: int) -> None:
        self._check(consumer)
        async with self.changed:
            if batch_id <= self.acked[consumer]:
                return  # a repeated acknowledgement changes nothing
            if batch_id not in self.batches:
                raise FeedError(f"{consumer!r} acknowledged batch {batch_id}, which the feed does not hold")
            self.acked[consumer] = max(self.acked[consumer], batch_id)
            floor = min(self.acked.values())
            while self.order and self.order[0] <= floor:  # every consumer is done with it
                done = self.order.pop(0)
                self.batches.pop(done)
                for c in self.next_index:
                    self.next_index[c] = max(0, self.next_index[c] - 1)
            self.changed.notify_all()

    def acked_through(self) -> int:
        """The highest batch id that every consumer has acknowledged (-1: none)."""
        return min(self.acked.values())

    def stats(self) -> dict:
        return {
            "held": len(self.order),
            "outstanding": self._outstanding(),
            "acked": dict(self.acked),
            "capacity": self.capacity,
        }

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=64)
    class FeedBuffer(_FeedBufferImpl):
        pass

    return FeedBuffer


class TrainingFeed:
    """The job's side of the feed: creates the named buffer actor, publishes, reads acks."""

    def __init__(self, *, consumers: tuple[str, ...], capacity: int, actor_name: str, namespace: str) -> None:
        import ray

        self.consumers = tuple(consumers)
        try:  # a buffer left by a previous run of the job in a long-lived cluster holds stale batches
            ray.kill(ray.get_actor(actor_name, namespace=namespace))
        except ValueError:
            pass
        self.actor = _actor_class().options(name=actor_name, namespace=namespace).remote(self.consumers, capacity)
        self.stats()  # wait until it is up

    def wait_for_room(self, timeout_s: float) -> bool:
        """True once fewer than `capacity` batches are unacknowledged; False after `timeout_s`."""
        import ray

        return ray.get(self.actor.wait_for_room.remote(timeout_s))

    def publish(self, batch_id: int, end_offsets: Offsets, examples: SequenceBatch) -> None:
        import ray

        ray.get(self.actor.put.remote(batch_id, end_offsets, [ray.put(examples)]))

    def acked_through(self) -> int:
        import ray

        return ray.get(self.actor.acked_through.remote())

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())

    def close(self) -> None:
        import ray

        try:
            ray.get(self.actor.close.remote(), timeout=10)
        finally:
            ray.kill(self.actor)


class FeedConsumer:
    """A consumer's handle on the feed, from any process connected to the job's Ray cluster."""

    def __init__(
        self, name: str, *, actor_name: str = "hstu-training-feed", namespace: str = "hstu", wait_s: float = 60.0
    ) -> None:
        import ray

        self.name = name
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.actor = ray.get_actor(actor_name, namespace=namespace)
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise FeedError(
                        f"no training feed {actor_name!r} in namespace {namespace!r} after {wait_s:.0f} s: "
                        "start the streaming job with feed.consumers set"
                    ) from None
                time.sleep(0.2)

    def next(self, timeout_s: float = 10.0) -> FeedBatch | None:
        """The next batch for this consumer, or None when none arrives within `timeout_s`.

        Raises FeedClosed once the job has stopped and closed the feed."""
        import ray
        from ray.exceptions import RayActorError

        try:
            got = ray.get(self.actor.get.remote(self.name, timeout_s))
        except RayActorError:
            raise FeedClosed(
                f"the training feed is gone (the streaming job stopped); {self.name!r} read all it got"
            ) from None
        if got == "closed":
            raise FeedClosed(f"the training feed was closed by the streaming job; {self.name!r} read everything")
        if got is None:
            return None
        batch_id, end, box = got
        return FeedBatch(batch_id=batch_id, end_offsets=end, examples=ray.get(box[0]))

    def ack(self, batch_id: int) -> None:
        """Say that this consumer is done with every batch up to `batch_id`."""
        import ray
        from ray.exceptions import RayActorError

        try:
            ray.get(self.actor.ack.remote(self.name, batch_id))
        except RayActorError:
            raise FeedClosed(
                f"the training feed is gone: batch {batch_id} will be delivered again after the "
                "job restarts, since its offsets were not committed"
            ) from None
