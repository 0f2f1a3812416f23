"""Producing engagement events into Kafka: a recorded log as fast as the broker takes it, or
synthetic events at a steady rate with the send time as the record timestamp (live traffic).

    python -m infra.producer --topic engagements --rate 1000 --seconds 60 --users 10000 --items 50000

`produce_at_rate` runs in its own process in the benchmarks and the main command (a producer
that shares a process with what it feeds would measure that process, not the system). Each
record's timestamp is the wall-clock time it was sent, so freshness measured from it is the time
from production.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pyarrow as pa

from config.loader import ConfigError
from infra.kafka.client_args import add_security_arguments, security_from_args
from streaming.kafka_security import (
    KafkaSecurityConfig,
    KafkaSecurityError,
    confluent_config,
    kafka_python_kwargs,
    raise_if_refused,
)

MOVIELENS_ACTIONS = ("rate_1", "rate_2", "rate_3", "rate_4", "rate_5")


def produce_log(
    table: pa.Table, bootstrap: str, topic: str, partitions: int, *, security: KafkaSecurityConfig | None = None
) -> float:
    """Produce a recorded log into `topic` (each record to its recorded partition, with its
    recorded timestamp) with confluent-kafka; returns events/s. Raises if any delivery failed.
    security: TLS/SASL of a secured broker (streaming/kafka_security.py)."""
    from confluent_kafka import Producer

    from infra.kafka.broker import TopicSpec, ensure_topics

    raise_if_refused(bootstrap, security)
    ensure_topics(bootstrap, (TopicSpec(name=topic, partitions=partitions),), security=security)
    producer = Producer(
        {
            **confluent_config(security),
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1 << 20,
            "queue.buffering.max.messages": 1_000_000,
            "acks": 1,
        }
    )
    failed: list = []

    def delivered(err, msg) -> None:
        if err is not None:
            failed.append(err)

    part = table.column("partition").to_pylist()
    keys, values = table.column("key").to_pylist(), table.column("value").to_pylist()
    stamps = table.column("timestamp_ms").to_pylist()
    t0 = time.monotonic()
    for i in range(table.num_rows):
        while True:
            try:
                producer.produce(
                    topic, value=values[i], key=keys[i], partition=part[i], timestamp=stamps[i], on_delivery=delivered
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain
                producer.poll(0.1)
        if i % 50_000 == 0:
            producer.poll(0)
    left = producer.flush(600)
    if left or failed:
        raise RuntimeError(f"producing {topic}: {left} records undelivered, {len(failed)} failed ({failed[:1]})")
    return table.num_rows / (time.monotonic() - t0)


def produce_at_rate(
    bootstrap: str,
    topic: str,
    *,
    rate: float,
    seconds: float,
    num_users: int,
    num_items: int = 50_000,
    seed: int = 0,
    actions: tuple[str, ...] = MOVIELENS_ACTIONS,
    popular: tuple[int, float] | None = None,
    security: KafkaSecurityConfig | None = None,
) -> dict:
    """Send synthetic events at `rate`/s for `seconds` (users uniform, items Zipf-like); the record
    timestamp and the event's ts_ms are the send time. `popular=(item, share)` makes that share of
    the events engage one item. Returns {"events", "seconds"}. security: TLS/SASL of a secured
    broker (streaming/kafka_security.py)."""
    from kafka import KafkaProducer

    from streaming.events import encode_values

    rng = np.random.default_rng(seed)
    raise_if_refused(bootstrap, security)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, **kafka_python_kwargs(security))
    n = int(rate * seconds)
    users = rng.integers(1, num_users + 1, size=n)
    items = np.minimum(rng.zipf(1.3, size=n), num_items)
    if popular is not None:
        items = np.where(rng.random(n) < popular[1], popular[0], items)
    codes = rng.integers(0, len(actions), size=n)
    t0 = time.monotonic()
    step = max(1, int(rate / 50))  # events per tick: 50 ticks a second
    for i in range(0, n, step):
        due = t0 + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now_ms = time.time_ns() // 1_000_000
        j = min(i + step, n)
        values = encode_values(users[i:j], items[i:j], [actions[c] for c in codes[i:j]], np.full(j - i, now_ms))
        for u, value in zip(users[i:j].tolist(), values):
            producer.send(topic, key=b"%d" % u, value=value, timestamp_ms=now_ms)
    producer.flush()
    producer.close()
    return {"events": n, "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.producer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", help="default: the broker `python -m infra.kafka start` runs")
    parser.add_argument("--topic", default="engagements")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    from infra.kafka.broker import read_info

    bootstrap = args.bootstrap or (read_info().bootstrap if read_info() else None)
    if bootstrap is None:
        print("error: no broker: run `python -m infra.kafka start` or pass --bootstrap", file=sys.stderr)
        return 1
    if args.rate <= 0 or args.seconds <= 0 or args.users < 1 or args.items < 1:
        print("error: --rate, --seconds, --users and --items must be positive", file=sys.stderr)
        return 2
    try:
        out = produce_at_rate(
            bootstrap,
            args.topic,
            rate=args.rate,
            seconds=args.seconds,
            num_users=args.users,
            num_items=args.items,
            seed=args.seed,
            security=security_from_args(args),
        )
    except (KafkaSecurityError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"produced {out['events']:,} events into {args.topic!r} in {out['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
