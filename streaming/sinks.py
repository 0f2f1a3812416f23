"""Where a micro-batch goes besides Feast: the offline store and the dead-letter sinks.

Every sink must be durable before the job commits offsets, and must tolerate a replay of the
same events after a crash (the job re-reads from the committed offsets):

- `OfflineStore` appends the raw valid events to Parquet, hive-partitioned by event day
  (`day=YYYY-MM-DD/`), for backfill and training from history. A file holds one partition's
  events of one day from one batch and is named by its first and last offsets
  (`p0003-<first>-<last>.parquet`), so the store's own watermark per (partition, day) is in the
  file names; a replayed event at or below it is not written again. Files are written to a
  temporary name, fsynced and renamed, so a crash leaves whole files only.
- `KafkaDeadLetters` produces each invalid record to the dead-letter topic (default
  `engagements.dlq`): the original value verbatim, the original key, and headers `reason`,
  `kind`, `source_topic`, `source_partition`, `source_offset`. Delivery is at-least-once: a
  replay after a crash between the produce and the commit sends the letter again with the same
  source coordinates, which identify it.
- `FileDeadLetters` is the recorded-log source's dead-letter topic: Parquet files
  (`p0000-<first>-<last>.parquet`) with the same fields, deduplicated like the offline store.

    >>> import tempfile, pathlib, pyarrow as pa
    >>> store = OfflineStore(pathlib.Path(tempfile.mkdtemp()), actions=("view", "buy"))
    >>> ev = pa.table({"partition": pa.array([0, 0], pa.int32()), "offset": [4, 5], "timestamp_ms": [0, 0],
    ...                "user_id": [1, 1], "item_id": [9, 8], "action": pa.array([0, 1], pa.int8()),
    ...                "ts_ms": [86_400_000, 86_400_001]})
    >>> store.append(ev), store.append(ev)   # the replay writes nothing
    (2, 0)
    >>> store.read().column("action").to_pylist()
    ['view', 'buy']
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.events import VALID_SCHEMA
from streaming.kafka_security import KafkaSecurityConfig, kafka_python_kwargs
from streaming.offsets import fsync_dir

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
_FILE = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")
# The decoder's valid-event columns plus the Kafka record timestamp.
OFFLINE_SCHEMA = VALID_SCHEMA.append(pa.field("timestamp_ms", pa.int64()))
DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("reason", pa.string()),
        ("kind", pa.string()),
    ]
)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_name(partition: int, first: int, last: int) -> str:
    return f"p{partition:04d}-{first:020d}-{last:020d}.parquet"


def _scan_watermarks(folder: Path, pattern: str) -> dict[tuple[str, int], int]:
    """{(subfolder name, partition): last offset written} from the file names under `folder`."""
    marks: dict[tuple[str, int], int] = {}
    for path in folder.glob(pattern):
        m = _FILE.match(path.name)
        if m is None:
            continue
        key = (path.parent.name, int(m.group(1)))
        marks[key] = max(marks.get(key, -1), int(m.group(3)))
    return marks


def _group_bounds(keys: np.ndarray) -> np.ndarray:
    """Start indices of the runs of equal values in sorted `keys`, plus len(keys) at the end."""
    return np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1, len(keys)]


class _Writers:
    """A small thread pool that runs a function over items and re-raises the first error."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None

    def run(self, fn, items: list) -> None:
        if len(items) <= 1 or self.threads == 1:
            for item in items:
                fn(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="offline-store")
        for _ in self._pool.map(fn, items):  # map re-raises a worker's exception here
            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class OfflineStore:
    """Append-only Parquet store of valid events, partitioned by event day (UTC)."""

    def __init__(self, root: Path, *, actions: tuple[str, ...], writers: int = 8) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dictionary = pa.array(list(actions), type=pa.string())
        self._marks = _scan_watermarks(self.root, "day=*/p*.parquet")
        self._pool = _Writers(writers)

    def close(self) -> None:
        self._pool.close()

    def append(self, events: pa.Table) -> int:
        """Write the events not yet in the store (EVENT_COLUMNS of streaming/sequence_update.py);
        returns how many were written. Durable when it returns."""
        if events.num_rows == 0:
            return 0
        day = events.column("ts_ms").to_numpy() // DAY_MS
        part = events.column("partition").to_numpy().astype(np.int64)
        off = events.column("offset").to_numpy()
        order = np.lexsort((off, part, day))  # by day, partition, offset
        day, part, off = day[order], part[order], off[order]
        table = events.take(pa.array(order))
        group_key = day * 1_000_003 + part
        bounds = _group_bounds(group_key)
        written = 0
        folders: set[Path] = set()
        files: list[tuple[pa.Table, Path]] = []
        marks: dict[tuple[str, int], int] = {}
        for g in range(len(bounds) - 1):  # one file per (day, partition) in the batch
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            folder_name = "day=" + datetime.fromtimestamp(int(day[lo]) * 86_400, tz=UTC).strftime("%Y-%m-%d")
            p = int(part[lo])
            mark = self._marks.get((folder_name, p), -1)
            lo += int(np.searchsorted(off[lo:hi], mark, side="right"))
            if lo >= hi:
                continue
            rows = table.slice(lo, hi - lo)
            out = pa.Table.from_arrays(
                [
                    rows.column("user_id"),
                    rows.column("item_id"),
                    pa.DictionaryArray.from_arrays(rows.column("action").combine_chunks(), self.dictionary),
                    rows.column("ts_ms"),
                    rows.column("partition"),
                    rows.column("offset"),
                    rows.column("timestamp_ms"),
                ],
                schema=OFFLINE_SCHEMA,
            )
            folder = self.root / folder_name
            files.append((out, folder / _file_name(p, int(off[lo]), int(off[hi - 1]))))
            folders.add(folder)
            marks[(folder_name, p)] = int(off[hi - 1])
            written += hi - lo
        # Files (and their fsyncs) are written by `writers` threads: a replay of history spans
        # hundreds of days per batch, and Parquet encoding and fsync both release the GIL.
        self._pool.run(lambda job: _write_parquet_atomic(*job), files)
        self._pool.run(fsync_dir, sorted(folders))
        if folders:
            fsync_dir(self.root)
        self._marks.update(marks)  # only once every file is durable
        return written

    def read(self) -> pa.Table:
        """Everything in the store (for tests and backfills), ordered by (partition, offset)."""
        files = sorted(self.root.glob("day=*/p*.parquet"))
        if not files:
            return OFFLINE_SCHEMA.empty_table()
        table = pa.concat_tables([pq.read_table(f, schema=OFFLINE_SCHEMA) for f in files])
        return table.take(pc.sort_indices(table, sort_keys=[("partition", "ascending"), ("offset", "ascending")]))


def _dead_letter_table(topic: str, letters: pa.Table) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([topic] * letters.num_rows, type=pa.string())]
        + [letters.column(name) for name in DEAD_LETTER_SCHEMA.names[1:]],
        schema=DEAD_LETTER_SCHEMA,
    )


class FileDeadLetters:
    """Dead letters of a recorded-log source, as Parquet files under `root`."""

    def __init__(self, root: Path, *, source_topic: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.source_topic = source_topic
        self._marks = {p: o for (_, p), o in _scan_watermarks(self.root, "p*.parquet").items()}

    def send(self, letters: pa.Table) -> int:
        """Write the letters (DEAD_LETTER_COLUMNS) not written before; durable when it returns."""
        if letters.num_rows == 0:
            return 0
        part = letters.column("partition").to_numpy().astype(np.int64)
        off = letters.column("offset").to_numpy()
        order = np.lexsort((off, part))
        part, off = part[order], off[order]
        table = letters.take(pa.array(order))
        bounds = _group_bounds(part)
        written = 0
        for g in range(len(bounds) - 1):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            p = int(part[lo])
            lo += int(np.searchsorted(off[lo:hi], self._marks.get(p, -1), side="right"))
            if lo >= hi:
                continue
            out = _dead_letter_table(self.source_topic, table.slice(lo, hi - lo))
            _write_parquet_atomic(out, self.root / _file_name(p, int(off[lo]), int(off[hi - 1])))
            self._marks[p] = int(off[hi - 1])
            written += hi - lo
        if written:
            fsync_dir(self.root)
        return written

    def flush(self) -> None:
        pass

    def read(self) -> pa.Table:
        files = sorted(self.root.glob("p*.parquet"))
        if not files:
            return DEAD_LETTER_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=DEAD_LETTER_SCHEMA) for f in files])

    def close(self) -> None:
        pass


def _ensure_topic(bootstrap: str, topic: str, *, request_timeout_ms: int, security: KafkaSecurityConfig | None) -> None:
    """Create the dead-letter topic (1 partition) when it does not exist: brokers usually refuse
    to create topics on first use, and a producer would then wait for metadata forever."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(request_timeout_ms, 11_000),
        **kafka_python_kwargs(security),
    )
    try:
        if topic not in admin.list_topics():
            try:
                admin.create_topics(
                    [NewTopic(name=topic, num_partitions=1, replication_factor=-1)]
                )  # the broker default
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class KafkaDeadLetters:
    """Dead letters produced to a topic; `flush` returns once the broker has them all."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        source_topic: str,
        request_timeout_ms: int = 15_000,
        security: KafkaSecurityConfig | None = None,
    ) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.source_topic = source_topic
        self._errors: list[BaseException] = []
        _ensure_topic(bootstrap, topic, request_timeout_ms=request_timeout_ms, security=security)
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=max(request_timeout_ms, 11_000),
            reconnect_backoff_max_ms=1000,
            max_block_ms=60_000,
            **kafka_python_kwargs(security),
        )

    def send(self, letters: pa.Table) -> int:
        """Queue the letters for the dead-letter topic (a loop per letter: they are rare)."""
        if letters.num_rows == 0:
            return 0
        source = self.source_topic.encode()
        for row in letters.to_pylist():
            headers = [
                ("reason", row["reason"].encode()),
                ("kind", row["kind"].encode()),
                ("source_topic", source),
                ("source_partition", str(row["partition"]).encode()),
                ("source_offset", str(row["offset"]).encode()),
            ]
            future = self._producer.send(
                self.topic,
                key=row["key"],
                value=row["value"],
                headers=headers,
                timestamp_ms=row["timestamp_ms"] if row["timestamp_ms"] >= 0 else None,
            )
            future.add_errback(self._errors.append)
        return letters.num_rows

    def flush(self) -> None:
        """Wait until every queued letter is acknowledged; raise if any failed (the batch is retried)."""
        from kafka.errors import KafkaError

        self._producer.flush(timeout=60)
        if self._errors:
            first, count = self._errors[0], len(self._errors)
            self._errors.clear()
            raise KafkaError(f"{count} dead letters to {self.topic!r} failed, first: {first!r}")

    def close(self) -> None:
        self._producer.close(timeout=30)
